import importlib
import importlib.util
import json
import math
import struct
import sys
import types
from pathlib import Path

import pytest

from mcibi_jax.train.writers import MetricWriter, NullWriter, flatten_hparams


def _lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _clu_usable() -> bool:
    try:
        importlib.import_module("clu.metric_writers")
    except Exception:
        return False
    return True


def _event_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a tensorboardX event file: TFRecord framing (u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, pos, found = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_jsonl_and_non_finite(tmp_path):
    writer = MetricWriter(tmp_path, backend="none")
    assert writer.backend == "none" and not writer.has_tensorboard
    writer.write_scalars(3, {"loss": 0.5, "lr": 1e-3})
    writer.write_scalars(4, {"loss": float("nan"), "grad": float("inf")})
    writer.write_hparams(
        {"optimizer": {"lr": 0.01, "betas": (0.9, 0.99)}, "seed": 1, "ratio": float("nan")}
    )
    writer.close()
    writer.close()  # idempotent
    assert _lines(tmp_path) == [
        {"step": 3, "loss": 0.5, "lr": 1e-3},
        {"step": 4, "loss": None, "grad": None},
        {
            "hparams": {
                "optimizer.lr": 0.01,
                "optimizer.betas": "(0.9, 0.99)",
                "seed": 1,
                "ratio": None,
            }
        },
    ]
    assert not (tmp_path / "tensorboard").exists()
    # appends across writers (resumed runs)
    writer = MetricWriter(tmp_path, backend="none")
    writer.write_scalars(5, {"loss": 0.25})
    writer.close()
    assert _lines(tmp_path)[-1] == {"step": 5, "loss": 0.25}


def test_flatten_hparams_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    config = ml_collections.ConfigDict(
        {"train": {"lr": 0.1, "steps": 10, "schedule": None}, "flag": True}
    )
    assert flatten_hparams({"config": config, "name": "x"}) == {
        "config.train.lr": 0.1,
        "config.train.steps": 10,
        "config.train.schedule": "None",
        "config.flag": True,
        "name": "x",
    }


def test_tensorboardx_backend(tmp_path):
    pytest.importorskip("tensorboardX")
    writer = MetricWriter(tmp_path, backend="tensorboardx")
    assert writer.backend == "tensorboardx" and writer.has_tensorboard
    writer.write_hparams({"model": {"name": "memorynet", "layers": [1, 2]}})
    writer.write_scalars(1, {"loss": 2.0})
    writer.write_scalars(2, {"loss": 1.5, "acc": 0.25})
    writer.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert _event_scalars(events[0]) == {"loss": [(1, 2.0), (2, 1.5)], "acc": [(2, 0.25)]}
    assert _lines(tmp_path)[0] == {"hparams": {"model.name": "memorynet", "model.layers": "[1, 2]"}}


def test_auto_backend(tmp_path):
    writer = MetricWriter(tmp_path)
    if _clu_usable():
        expected = "clu"
    elif importlib.util.find_spec("tensorboardX") is not None:
        expected = "tensorboardx"
    else:
        expected = "none"
    assert writer.backend == expected
    assert writer.has_tensorboard == (expected != "none")
    writer.close()


def test_forced_clu_without_tensorflow(tmp_path):
    if _clu_usable():
        pytest.skip("clu.metric_writers imports here")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[clu\]"'):
        MetricWriter(tmp_path, backend="clu")


def test_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="unknown metric writer backend"):
        MetricWriter(tmp_path, backend="wandb")


class _FakeSummaryWriter:
    instances: list["_FakeSummaryWriter"] = []

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.calls: list[tuple] = []
        _FakeSummaryWriter.instances.append(self)

    def write_scalars(self, step, scalars):
        self.calls.append(("write_scalars", step, dict(scalars)))

    def write_hparams(self, hparams):
        self.calls.append(("write_hparams", dict(hparams)))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


@pytest.mark.parametrize("backend", ["auto", "clu", "CLU"])
def test_clu_backend_wiring(tmp_path, monkeypatch, backend):
    fake = types.ModuleType("clu.metric_writers")
    fake.SummaryWriter = _FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "clu.metric_writers", fake)
    monkeypatch.setattr(_FakeSummaryWriter, "instances", [])

    writer = MetricWriter(tmp_path, backend=backend)
    assert writer.backend == "clu" and writer.has_tensorboard
    (clu_writer,) = _FakeSummaryWriter.instances
    assert Path(clu_writer.logdir) == tmp_path / "tensorboard"
    writer.write_hparams({"optimizer": {"lr": 0.01, "policy": None}})
    writer.write_scalars(7, {"loss": 1.25, "bad": float("nan")})
    writer.flush()
    writer.close()
    writer.close()
    (hparams_call, scalars_call, flush_call, close_call) = clu_writer.calls
    assert hparams_call == ("write_hparams", {"optimizer.lr": 0.01, "optimizer.policy": "None"})
    name, step, scalars = scalars_call
    assert (name, step, scalars["loss"]) == ("write_scalars", 7, 1.25) and math.isnan(
        scalars["bad"]
    )
    assert type(step) is int and all(type(v) is float for v in scalars.values())
    assert (flush_call, close_call) == (("flush",), ("close",))
    assert _lines(tmp_path) == [
        {"hparams": {"optimizer.lr": 0.01, "optimizer.policy": "None"}},
        {"step": 7, "loss": 1.25, "bad": None},
    ]


def test_null_writer():
    writer = NullWriter()
    assert writer.backend == "none" and not writer.has_tensorboard
    writer.write_scalars(0, {"loss": 1.0})
    writer.write_hparams({"a": {"b": 1}})
    writer.flush()
    writer.close()
