"""Resumable training checkpoints: the whole train state plus the input pipeline's position.

One orbax ``CheckpointManager`` under ``WORKDIR/train_state/<step>/`` with two items:
``state`` (params, optimizer state, BatchNorm statistics, memory, step) and ``data`` (the
iterator state, JSON). Saves are atomic (orbax writes to a temporary directory first), so an
interrupted run never leaves a half-written checkpoint, and the last ``keep`` are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
