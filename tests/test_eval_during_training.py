"""Evaluation during training (``train.eval_every``), the best checkpoint, and evaluation spread
over several devices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mcibi_jax import load_config
from mcibi_jax.train.checkpoints import (
    BEST,
    BestCheckpoint,
    checkpoint_to_evaluate,
    latest_checkpoint,
)
from mcibi_jax.train.experiment import run
from tests.helpers import DEMO_CONFIG, DEMO_FAST, result_of, run_python


def test_periodic_evaluation_keeps_the_best_checkpoint(tmp_path):
    config = load_config(DEMO_CONFIG, DEMO_FAST + ["train.eval_every=1"])
    lines: list[str] = []
    results = run(config, tmp_path, "train_and_eval", log=lines.append)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = {r["step"]: r["eval/mIoU"] for r in records if "eval/mIoU" in r}
    assert sorted(evaluations) == [8, 16, 24]  # after each of the 3 epochs
    assert sum(line.startswith("epoch ") and " evaluation: mIoU " in line for line in lines) == 3
    best_step = max(evaluations, key=evaluations.get)
    best = json.loads((tmp_path / "checkpoints" / BEST / "best.json").read_text())
    assert best["step"] == best_step and best["epoch"] == best_step // 8
    assert best["mIoU"] == pytest.approx(evaluations[best_step])
    assert results["best"]["step"] == best_step and results["eval"]["mIoU"] == pytest.approx(
        evaluations[24]
    )

    # the best checkpoint is never the "newest" one, and eval.checkpoint=best scores it again
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "final"
    config.eval.checkpoint = BEST
    again = run(config, tmp_path, "eval", log=lambda message: None)
    assert again["checkpoint"] == str(tmp_path / "checkpoints" / BEST)
    assert again["eval"]["mIoU"] == pytest.approx(best["mIoU"], abs=1e-9)


def test_training_only_mode_evaluates_only_when_asked(tmp_path):
    run(
        load_config(DEMO_CONFIG, DEMO_FAST + ["train.eval_every=0"]),
        tmp_path / "off",
        "train",
        log=lambda message: None,
    )
    assert not (tmp_path / "off" / "checkpoints" / BEST).exists()
    run(
        load_config(DEMO_CONFIG, DEMO_FAST + ["train.eval_every=2"]),
        tmp_path / "on",
        "train",
        log=lambda message: None,
    )
    records = [
        json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if "eval/mIoU" in r] == [16, 24]  # epoch 2 and the last one
    assert (tmp_path / "on" / "checkpoints" / BEST / "best.json").exists()


def test_eval_checkpoint_choice(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.eval_every > 0"):
        checkpoint_to_evaluate(tmp_path, BEST)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint_to_evaluate(tmp_path, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="train first"):
        checkpoint_to_evaluate(tmp_path, "")


def _variables(value: float) -> dict:
    return {"params": {"w": np.full((2, 3), value, np.float32)}, "batch_stats": {}, "memory": {}}


def test_best_checkpoint_only_moves_up(tmp_path):
    best = BestCheckpoint(tmp_path / "best")
    assert best.record is None
    assert not best.offer(_variables(0.0), {"mIoU": float("nan")}, step=1)  # nothing scored
    assert not best.offer(_variables(0.0), {"mIoU": None}, step=1)  # ... as results.json writes it
    assert best.offer(_variables(1.0), {"mIoU": 0.5}, step=2)
    assert not best.offer(_variables(2.0), {"mIoU": 0.4}, step=3)
    assert not best.offer(_variables(2.0), {"mIoU": 0.5}, step=4)  # a tie keeps the earlier one
    assert best.offer(_variables(3.0), {"mIoU": 0.6}, step=5)
    assert best.record == {"step": 5, "mIoU": 0.6}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]

    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "best")
    np.testing.assert_array_equal(restored["params"]["w"], np.full((2, 3), 3.0))


def test_best_checkpoint_recovers_from_an_interrupted_swap(tmp_path):
    best = BestCheckpoint(tmp_path / "best")
    best.offer(_variables(1.0), {"mIoU": 0.5}, step=2)
    # stopped after moving the old best aside and before moving the new one in
    (tmp_path / "best").rename(tmp_path / "best.old")
    (tmp_path / "best.new").mkdir()
    (tmp_path / "best.new" / "partial").write_text("")
    again = BestCheckpoint(tmp_path / "best")
    assert again.record == {"step": 2, "mIoU": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


SPREAD = r"""
import json
import jax, numpy as np
from mcibi_jax import load_config
from mcibi_jax.evaluation.inference import confusion_counts
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.train.state import init_variables

config = load_config("configs/demo.py")
model = build_model(config.model)
variables = init_variables(model, jax.random.key(0, impl="rbg"), (32, 32))
rng = np.random.default_rng(0)
sizes = [(32, 32), (40, 24), (32, 32), (24, 48), (16, 16)]  # images of different sizes
batches = [{"images": rng.standard_normal((1, h, w, 3), dtype=np.float32),
            "labels": rng.integers(-1, 4, (1, h, w)).astype(np.int32)} for h, w in sizes]
spread = confusion_counts(model, variables, batches, num_classes=4, ignore_label=-1)
single = confusion_counts(model, variables, batches, num_classes=4, ignore_label=-1, devices=jax.local_devices()[:1])
labelled = int(sum((b["labels"] != -1).sum() for b in batches))
print("RESULT " + json.dumps({"devices": jax.local_device_count(), "spread": spread.tolist(), "single": single.tolist(),
                              "labelled": labelled}))
"""


def test_evaluation_spreads_images_over_local_devices():
    result = result_of(run_python(SPREAD, devices=4))
    assert result["devices"] == 4
    assert result["spread"] == result["single"]
    assert np.asarray(result["single"]).sum() == result["labelled"]
