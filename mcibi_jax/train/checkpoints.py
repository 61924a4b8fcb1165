"""Resumable training checkpoints: the whole train state plus the input pipeline's position.

One orbax ``CheckpointManager`` under ``WORKDIR/train_state/<step>/`` with two items:
``state`` (params, optimizer state, BatchNorm statistics, memory, step) and ``data``: each
process's iterator state as ``data/process_<i>-of-<n>.json`` (Grain's layout), since every
host reads its own part of the stream. Saves are asynchronous: ``save`` returns once the
arrays are copied off the devices and the files are written while training goes on; the
next ``save`` and ``close`` wait for them. They are atomic (orbax writes to a temporary
directory and renames it when every host is done), so a run killed in the middle of a save
keeps the previous checkpoint, and the temporary directory is removed on the next start. The
newest ``keep`` are kept (a ``LatestN`` preservation policy).

Exported variables (``python -m mcibi_jax.main`` writes them; predict, serve and export read
them) live under ``WORKDIR/checkpoints/``: ``final`` (or ``step_<N>`` when that is taken, see
:func:`new_checkpoint_dir`) and ``best`` (:data:`BEST`, :class:`BestCheckpoint`: the variables
of the best evaluation during training). :func:`latest_checkpoint` and
:func:`checkpoint_to_evaluate` find them again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store  # pinned: orbax <0.13

from mcibi_jax.config import ConfigError
from mcibi_jax.porting.variables import save_variables
from mcibi_jax.train.state import TrainState

BEST = "best"  # WORKDIR/checkpoints/best: the variables of the best evaluation during training


class _SkipWaitWarning(logging.Filter):
    """Drops orbax's "Waiting for previous save to complete" warning: waiting for the previous
    (asynchronous) save before the next one is the intended behaviour here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Waiting for previous save")


logging.getLogger("absl").addFilter(_SkipWaitWarning())


def process_file(index: int, count: int) -> str:
    """``process_<i>-of-<n>.json``: process i's data state (the file name Grain's handler uses)."""
    return f"process_{index}-of-{count}.json"


class ProcessDataHandler(ocp.AsyncCheckpointHandler):
    """Orbax handler of a JSON-able dict per process: each writes (in the background, like the
    arrays) and reads its own ``process_<i>-of-<n>.json`` in the item directory."""

    async def async_save(self, directory: Any, args: ProcessDataSave) -> list[Any]:
        text = json.dumps(args.state, indent=1) + "\n"  # the state as it is now
        path = directory / process_file(jax.process_index(), jax.process_count())

        async def write() -> None:
            self.write(path, text)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="mcibi_data_state")]

    @staticmethod
    def write(path: Any, text: str) -> None:
        path.write_text(text)

    def save(self, directory: Any, args: ProcessDataSave) -> None:
        self.write(
            directory / process_file(jax.process_index(), jax.process_count()),
            json.dumps(args.state, indent=1) + "\n",
        )

    def restore(self, directory: Any, args: ProcessDataRestore | None = None) -> Any:
        index, count = jax.process_index(), jax.process_count()
        path = directory / process_file(index, count)
        if path.exists():
            return json.loads(path.read_text())
        legacy = directory / "metadata"  # orbax's JSON item, written before the per-process files
        if count == 1 and legacy.exists():
            return json.loads(legacy.read_text())
        found = sorted(p.name for p in directory.glob("process_*-of-*.json"))
        saved = (
            f"written by {found[0].split('-of-')[1][:-5]} process(es)"
            if found
            else "without a data state"
        )
        raise DataStateMismatch(
            f"the checkpoint was {saved}, and this run has {count} "
            f"(no {path.name}); resume with the same number of processes"
        )

    def metadata(self, directory: Any) -> None:
        return None

    def finalize(self, directory: Any) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(ProcessDataHandler, for_save=True)
@dataclasses.dataclass
class ProcessDataSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(ProcessDataHandler, for_restore=True)
@dataclasses.dataclass
class ProcessDataRestore(ocp.args.CheckpointArgs):
    pass


class DataStateMismatch(ValueError):
    """A checkpoint's data state does not belong to this run's processes or pipeline."""


# Replicated arrays (the whole train state under data parallelism) can be written by their
# replicas together, each a slice, so that every host writes a part. Within one host that only
# multiplies the work: each slice is an op dispatched (and, per new shape, compiled) on its
# device. So: only across hosts, and only where a slice holds at least this many bytes.
# Measured, R-50 Cityscapes train state (647 arrays, 696 MiB) on one host with 8 CPU devices:
# the first save held the step 30.9 s with every array sliced, 1.8 s from 8 MiB a slice, 1.3 s
# unsliced; later saves 2.6-2.8 s, 0.26-0.28 s, 0.22 s (benchmarks/checkpoint_save.py).
REPLICA_PARALLEL_MIN_BYTES = 8 << 20


def _state_handler(replica_parallel_min_bytes: int | None = None) -> ocp.PyTreeCheckpointHandler:
    """orbax's handler of the train state with its standard type handlers (in a registry of its
    own: orbax's global one is left alone). Replicas write slices of an array from
    ``replica_parallel_min_bytes`` a slice on; by default (None) only across processes, from
    :data:`REPLICA_PARALLEL_MIN_BYTES`."""
    replica_parallel = replica_parallel_min_bytes is not None or jax.process_count() > 1
    if replica_parallel_min_bytes is None:
        replica_parallel_min_bytes = REPLICA_PARALLEL_MIN_BYTES
    scalars = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalars),
        (float, scalars),
        (bytes, scalars),
        (np.number, scalars),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                array_metadata_store=array_metadata_store.Store(),
                use_replica_parallel=replica_parallel,
                min_slice_bytes_for_replica_parallel=replica_parallel_min_bytes,
            ),
        ),
        (str, ocp.type_handlers.StringHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class TrainCheckpoints:
    def __init__(
        self, directory: str | Path, keep: int = 3, replica_parallel_min_bytes: int | None = None
    ):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(n=max(1, int(keep))),
                create=True,
                enable_async_checkpointing=True,
                cleanup_tmp_directories=True,
            ),
            item_names=("state", "data"),
            item_handlers={
                "state": _state_handler(replica_parallel_min_bytes),
                "data": ProcessDataHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def step_directory(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, state: TrainState, data_state: Any = None) -> Path:
        """Starts saving ``state`` and this process's ``data_state`` (call it on every process);
        returns the checkpoint's directory, complete after the next ``save``, ``wait`` or ``close``."""
        step = int(state.step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ProcessDataSave(data_state or {})
            ),
        )
        return self.step_directory(step)

    def wait(self) -> None:
        """Blocks until the last save is on disk."""
        self._manager.wait_until_finished()

    def restore_latest(self, like: TrainState) -> tuple[TrainState, Any] | None:
        """(state, this process's data state) of the newest checkpoint, shaped and sharded like
        ``like``; None when there is none. See :meth:`restore`."""
        step = self._manager.latest_step()
        return None if step is None else self.restore(step, like)

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, Any]:
        """(state, this process's data state) of the checkpoint of ``step``, shaped and sharded
        like ``like``. A checkpoint that cannot be resumed (another model, another number of
        processes, unreadable files) is a ConfigError."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        like, restore_args=ocp.checkpoint_utils.construct_restore_args(like)
                    ),
                    data=ProcessDataRestore(),
                ),
            )
        except DataStateMismatch as error:
            raise ConfigError(f"cannot resume from {self.step_directory(step)}: {error}") from None
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"{self.directory} holds a training checkpoint (step {step}) that does not fit this config: "
                f"{_first_line(error)}. Use a new --workdir, or the config it was trained with (training states "
                "saved by mcibi_jax before 2026-12-02 hold the optimizer state in another layout: export "
                "their variables with that version, then train on with train.init_from)."
            ) from None
        except (OSError, RuntimeError) as error:
            raise ConfigError(
                f"cannot read the training checkpoint {self.step_directory(step)}: {_first_line(error)}. "
                "Remove that directory to resume from the one before, or use a new --workdir."
            ) from None
        return restored.state, restored.data

    def close(self) -> None:
        self._manager.close()


def _first_line(error: BaseException) -> str:
    """The error's first line, without orbax's advice on its own API options."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(" Truncating/padding is disabled")[0].rstrip(".")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class BestCheckpoint:
    """The variables of the best evaluation so far, at a stable path (``WORKDIR/checkpoints/best``,
    loadable like any exported checkpoint) with ``best.json`` inside ({"step", "epoch", metric}).

    A better result is written next to it first and then swapped in by two renames, so a crash
    leaves either the old or the new best, never a partial one. Every process of a multi-host run
    calls :meth:`offer`; process 0 does the file moves.
    """

    INFO = "best.json"

    def __init__(self, directory: str | Path, metric: str = "mIoU"):
        self.directory = Path(directory).absolute()
        self.metric = metric
        self._new = self.directory.with_name(self.directory.name + ".new")
        self._old = self.directory.with_name(self.directory.name + ".old")
        if jax.process_index() == 0:
            if (
                not self.directory.exists() and self._old.exists()
            ):  # stopped between the two renames
                self._old.rename(self.directory)
            for leftover in (self._new, self._old):
                shutil.rmtree(leftover, ignore_errors=True)
        _sync("mcibi_best_checkpoint_init")

    @property
    def record(self) -> dict[str, Any] | None:
        """What ``best.json`` says about the current best, or None before the first one."""
        info = self.directory / self.INFO
        return json.loads(info.read_text()) if info.exists() else None

    def offer(
        self, variables: Mapping[str, Any], metrics: Mapping[str, Any], **details: Any
    ) -> bool:
        """Makes ``variables`` the best if ``metrics[self.metric]`` beats the current best (no
        score, NaN or None as in results.json, never does); returns whether it did."""

        value = float("nan") if metrics[self.metric] is None else float(metrics[self.metric])
        current = self.record
        if not math.isfinite(value) or (
            current is not None and value <= float(current[self.metric])
        ):
            return False
        save_variables(self._new, variables)
        _sync("mcibi_best_checkpoint_saved")
        if jax.process_index() == 0:
            (self._new / self.INFO).write_text(
                json.dumps({**details, self.metric: value}, indent=2) + "\n"
            )
            if self.directory.exists():
                self.directory.rename(self._old)
            self._new.rename(self.directory)
            shutil.rmtree(self._old, ignore_errors=True)
        _sync("mcibi_best_checkpoint_swapped")
        return True


# --------------------------------------------------------------------------------------------
# Where exported variables go, and which to evaluate


def new_checkpoint_dir(workdir: Path, step: int) -> Path:
    """WORKDIR/checkpoints/final, or WORKDIR/checkpoints/step_<N>[_<i>] when that is already
    taken: an exported checkpoint is never overwritten."""
    root = Path(workdir) / "checkpoints"
    candidates = [root / "final", root / f"step_{step}"]
    candidates += [root / f"step_{step}_{i}" for i in range(1, 1000)]
    for path in candidates:
        if not path.exists() or not any(path.iterdir()):
            return path
    raise FileExistsError(f"no free checkpoint directory under {root}")


def latest_checkpoint(workdir: Path) -> Path:
    """The newest exported checkpoint under WORKDIR/checkpoints (the best-so-far one aside)."""
    root = Path(workdir) / "checkpoints"
    found = [
        p
        for p in root.glob("*")  # nothing when there is no such folder
        if p.is_dir() and not p.name.startswith(BEST) and any(p.iterdir())
    ]
    if not found:
        raise FileNotFoundError(
            f"no checkpoint under {root}; train first (--mode=train or train_and_eval)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def checkpoint_to_evaluate(workdir: Path, choice: str) -> Path:
    """``eval.checkpoint``: '' (the newest), 'best' (the best evaluation during training) or a
    checkpoint directory."""
    if not choice:
        return latest_checkpoint(workdir)
    path = Path(workdir) / "checkpoints" / BEST if choice == BEST else Path(choice).absolute()
    if not path.is_dir():
        hint = (
            " (it is written when train.eval_every > 0 or in --mode=train_and_eval)"
            if choice == BEST
            else ""
        )
        raise FileNotFoundError(f"eval.checkpoint={choice!r}: no checkpoint at {path}{hint}")
    return path
