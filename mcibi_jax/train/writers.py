"""Where training metrics go besides stdout: ``metrics.jsonl`` always, TensorBoard when
tensorboardX is installed (``pip install -e ".[tensorboard]"``).

clu's metric writers need TensorFlow for TensorBoard output, which this package otherwise
never needs; the interface here is the same (``write_scalars(step, scalars)``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping


class MetricWriter:
    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            self._tensorboard = None
        else:
            self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    @property
    def has_tensorboard(self) -> bool:
        return self._tensorboard is not None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, int(step))

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class NullWriter:
    """For the processes other than 0."""

    has_tensorboard = False

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
