"""Where training metrics go besides stdout: ``WORKDIR/metrics.jsonl`` always, and TensorBoard
event files under ``WORKDIR/tensorboard`` through one of two optional backends:

- ``"clu"``: clu's ``metric_writers.SummaryWriter`` (``pip install -e ".[clu]"``; needs
  TensorFlow and tensorboard, which this package otherwise never needs);
- ``"tensorboardx"``: tensorboardX (``pip install -e ".[tensorboard]"``, light).

``backend="auto"`` (the default) takes clu when ``clu.metric_writers`` imports, else
tensorboardX when installed, else writes the jsonl file only.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BACKENDS = ("auto", "clu", "tensorboardx", "none")
_EXTRA = {"clu": "clu", "tensorboardx": "tensorboard"}
_log = logging.getLogger(__name__)


def flatten_hparams(
    hparams: Mapping[str, Any], prefix: str = ""
) -> dict[str, bool | int | float | str]:
    """Nested mappings (ConfigDicts included) -> one level with '.'-joined keys; values that are
    not bool/int/float/str (lists, None, arrays, ...) become their ``str``."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if hasattr(value, "to_dict"):  # ml_collections ConfigDict / FrozenConfigDict
            value = value.to_dict()
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, name + "."))
        elif isinstance(value, (bool, str)):
            flat[name] = value
        elif isinstance(value, numbers.Integral):
            flat[name] = int(value)
        elif isinstance(value, numbers.Real):
            flat[name] = float(value)
        else:
            flat[name] = str(value)
    return flat


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity: non-finite floats are written as null.
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _clu_writer(logdir: Path) -> Any:
    metric_writers = importlib.import_module("clu.metric_writers")
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        # TensorFlow only writes summaries here: keep it off the GPUs JAX uses (before the
        # summary writer initialises its runtime).
        try:
            tf.config.set_visible_devices([], "GPU")
        except Exception:  # already initialised, or no such API: leave it as it is
            pass
    return metric_writers.SummaryWriter(str(logdir))


def _tensorboardx_writer(logdir: Path) -> Any:
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir))


_FACTORIES = {"clu": _clu_writer, "tensorboardx": _tensorboardx_writer}


def _open_backend(backend: str, logdir: Path) -> tuple[str, Any]:
    if backend == "none":
        return "none", None
    if backend != "auto":
        try:
            return backend, _FACTORIES[backend](logdir)
        except ImportError as err:
            raise ImportError(
                f'MetricWriter(backend="{backend}") needs the optional dependencies: '
                f'pip install -e ".[{_EXTRA[backend]}]" (import failed: {err})'
            ) from err
    for name in ("clu", "tensorboardx"):
        try:
            return name, _FACTORIES[name](logdir)
        except Exception as err:  # a broken TensorFlow install can fail with more than ImportError
            _log.debug("metric writer backend %s unavailable: %r", name, err)
    return "none", None


def read_records(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of ``WORKDIR/metrics.jsonl`` (none when it does not exist; a line cut off
    by a crash is skipped)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def rewind_records(
    workdir: str | Path, step: int | None, redo_evaluation: bool = False
) -> list[dict[str, Any]]:
    """Before a launch that resumes from the checkpoint at ``step`` (None: a fresh start, which
    keeps everything): drops from metrics.jsonl what an earlier launch logged after that step
    (that work is redone, so no step is written twice), and with ``redo_evaluation`` the
    evaluation at ``step`` itself. Returns the records kept."""
    records = read_records(workdir)
    if step is None:
        return records

    def keep(record: Mapping[str, Any]) -> bool:
        at = record.get("step")
        if at is None or at < step:
            return True
        is_evaluation = any(k.startswith("eval/") for k in record)
        return at == step and not (redo_evaluation and is_evaluation)

    kept = [r for r in records if keep(r)]
    if len(kept) != len(records):
        path = Path(workdir) / "metrics.jsonl"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        temporary.replace(path)
    return kept


class MetricWriter:
    """Writes ``WORKDIR/metrics.jsonl`` (one JSON object per line) and, depending on ``backend``
    (one of ``BACKENDS``), TensorBoard event files under ``WORKDIR/tensorboard``. ``.backend`` is
    the TensorBoard backend in use ("clu", "tensorboardx" or "none")."""

    def __init__(self, workdir: str | Path, backend: str = "auto"):
        choice = backend.lower()
        if choice not in BACKENDS:
            raise ValueError(
                f"unknown metric writer backend {backend!r}; expected one of {BACKENDS}"
            )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backend, self._tensorboard = _open_backend(choice, self.workdir / "tensorboard")
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
        self._closed = False
        self._last_hparams: dict[str, Any] | None = None

    @property
    def has_tensorboard(self) -> bool:
        return self._tensorboard is not None

    def _write_line(self, record: Mapping[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One jsonl line ``{"step": step, **scalars}`` (non-finite values as null)."""
        step = int(step)
        values = {k: float(v) for k, v in scalars.items()}
        self._write_line({"step": step, **{k: _json_safe(v) for k, v in values.items()}})
        if self.backend == "clu":
            self._tensorboard.write_scalars(step, values)
        elif self.backend == "tensorboardx":
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """One jsonl line ``{"hparams": {...}}`` with the hparams flattened by ``flatten_hparams``;
        clu: its ``write_hparams`` (TensorBoard HParams tab); tensorboardX: a text summary.
        Nothing when they equal the last hparams line already in metrics.jsonl (a resumed run)."""
        flat = flatten_hparams(hparams)
        record = {"hparams": {k: _json_safe(v) for k, v in flat.items()}}
        if self._last_hparams is None:  # the last hparams line of an earlier launch (a resumed run)
            self._last_hparams = next(
                (r for r in reversed(read_records(self.workdir)) if "hparams" in r), {}
            )
        if record == self._last_hparams:
            return  # a resumed run with the same settings: said once
        self._last_hparams = record
        self._write_line(record)
        if self.backend == "clu":
            self._tensorboard.write_hparams(flat)
        elif self.backend == "tensorboardx":
            table = "\n".join(
                ["| name | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in flat.items()]
            )
            self._tensorboard.add_text("hparams", table, 0)

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class NullWriter:
    """For the processes other than 0."""

    backend = "none"
    has_tensorboard = False

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
