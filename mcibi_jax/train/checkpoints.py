"""Resumable training checkpoints: the whole train state plus the input pipeline's position.

One orbax ``CheckpointManager`` under ``WORKDIR/train_state/<step>/`` with two items:
``state`` (params, optimizer state, BatchNorm statistics, memory, step) and ``data`` (the
iterator state, JSON). Saves are atomic (orbax writes to a temporary directory first), so an
interrupted run never leaves a half-written checkpoint, and the last ``keep`` are kept.

``BestCheckpoint``: the exported variables of the best evaluation during training.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from mcibi_jax.config import ConfigError
from mcibi_jax.train.state import TrainState


class TrainCheckpoints:
    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, data_state: Any = None) -> None:
        step = int(state.step)
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})),
        )
        self._manager.wait_until_finished()

    def restore_latest(self, like: TrainState) -> tuple[TrainState, Any] | None:
        """(state, data state) of the newest checkpoint, shaped and sharded like ``like``;
        None when there is none. A checkpoint of another model is a ConfigError."""
        step = self._manager.latest_step()
        if step is None:
            return None
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like), data=ocp.args.JsonRestore())
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"{self.directory} holds a training checkpoint (step {step}) that does not fit this config: "
                f"{str(error).splitlines()[0]}. Use a new --workdir, or the config it was trained with."
            ) from None
        return restored.state, restored.data

    def close(self) -> None:
        self._manager.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

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
            if not self.directory.exists() and self._old.exists():  # stopped between the two renames
                self._old.rename(self.directory)
            for leftover in (self._new, self._old):
                shutil.rmtree(leftover, ignore_errors=True)
        _sync("mcibi_best_checkpoint_init")

    @property
    def record(self) -> dict[str, Any] | None:
        """What ``best.json`` says about the current best, or None before the first one."""
        info = self.directory / self.INFO
        return json.loads(info.read_text()) if info.exists() else None

    def offer(self, variables: Mapping[str, Any], metrics: Mapping[str, Any], **details: Any) -> bool:
        """Makes ``variables`` the best if ``metrics[self.metric]`` beats the current best (no
        score, NaN or None as in results.json, never does); returns whether it did."""
        from mcibi_jax.porting.port import save_variables

        value = float("nan") if metrics[self.metric] is None else float(metrics[self.metric])
        current = self.record
        if not math.isfinite(value) or (current is not None and value <= float(current[self.metric])):
            return False
        save_variables(self._new, variables)
        _sync("mcibi_best_checkpoint_saved")
        if jax.process_index() == 0:
            (self._new / self.INFO).write_text(json.dumps({**details, self.metric: value}, indent=2) + "\n")
            if self.directory.exists():
                self.directory.rename(self._old)
            self._new.rename(self.directory)
            shutil.rmtree(self._old, ignore_errors=True)
        _sync("mcibi_best_checkpoint_swapped")
        return True
