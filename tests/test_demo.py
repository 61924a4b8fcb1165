"""The training entry point on a tiny version of the synthetic demo (configs/demo.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcibi_jax.config import load_config
from mcibi_jax.data.synthetic import IGNORE_LABEL, make_split
from mcibi_jax.porting.variables import load_variables
from mcibi_jax.train.checkpoints import latest_checkpoint, new_checkpoint_dir
from mcibi_jax.train.experiment import run
from mcibi_jax.train.loop import TrainingDiverged
from tests.helpers import DEMO_CONFIG, DEMO_FAST, REPO


def test_synthetic_split_is_deterministic_and_well_formed():
    images, labels = make_split(5, 3, (24, 32), num_classes=4)
    again, _ = make_split(5, 3, (24, 32), num_classes=4)
    np.testing.assert_array_equal(images, again)
    assert images.shape == (3, 24, 32, 3) and images.dtype == np.float32
    assert labels.shape == (3, 24, 32) and labels.dtype == np.int32
    assert set(np.unique(labels)) <= {IGNORE_LABEL, 0, 1, 2, 3}
    assert (labels == IGNORE_LABEL).any() and (labels == 0).any()
    assert abs(float(images.mean())) < 1.0 and 0.3 < float(images.std()) < 2.0
    assert not np.array_equal(make_split(6, 1, 16)[1], make_split(5, 1, 16)[1])


def test_train_and_eval_writes_results_and_checkpoint(tmp_path):
    config = load_config(DEMO_CONFIG, DEMO_FAST)
    lines: list[str] = []
    results = run(config, tmp_path, "train_and_eval", log=lines.append)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["train"]["steps"] == 24
    history = saved["train"]["history"]
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20, 24]
    assert history[-1]["loss"] < history[0]["loss"]
    segmentation = [h["loss"] - h["loss_memory"] for h in history]
    assert segmentation[-1] < 0.9 * segmentation[0]
    assert history[-1]["loss_cls_stage2"] < history[0]["loss_cls_stage2"]
    # the memory loss joins in epoch 2 (step 9) and then falls
    assert history[0]["loss_memory"] == history[1]["loss_memory"] == 0.0
    assert history[2]["loss_memory"] > history[-1]["loss_memory"] > 0.0
    assert history[-1]["lr"] < history[0]["lr"]
    # the memory momentum follows the learning rate (demo: base momentum 0.9 at base lr 0.02)
    assert all(
        h["memory_momentum"] == pytest.approx(0.9 / 0.02 * h["lr"], rel=1e-5) for h in history
    )
    ev = saved["eval"]
    assert set(ev["IoU"]) == {"background", "shape1", "shape2", "shape3"}
    # one unit, percent: the table, the line after the epoch, results.json, best.json, metrics.jsonl
    assert 0.0 <= ev["mIoU"] <= 100.0 and 0.0 <= ev["aAcc"] <= 100.0 and 0.0 <= ev["mAcc"] <= 100.0
    assert ev["aAcc"] > 1.0  # not a fraction: at least the background is mostly right
    # the table
    assert f"\nmIoU {ev['mIoU']:.2f}  aAcc {ev['aAcc']:.2f}  mAcc {ev['mAcc']:.2f}" in "\n".join(
        lines
    )
    assert any(
        line.startswith(f"epoch 3 evaluation: mIoU {ev['mIoU']:.2f} aAcc {ev['aAcc']:.2f} ")
        for line in lines
    )
    assert (
        all(v is None or 0.0 <= v <= 100.0 for v in ev["IoU"].values())
        and ev["IoU"]["background"] > 1.0
    )
    best = json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())
    assert best["mIoU"] == pytest.approx(ev["mIoU"]) and saved["best"]["mIoU"] == pytest.approx(
        ev["mIoU"]
    )
    assert saved == json.loads(json.dumps(results))

    # the logged values also go to metrics.jsonl (and TensorBoard when tensorboardX is installed)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval/mIoU" in r]
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    assert [r["step"] for r in evaluations] == [24] and evaluations[0][
        "eval/mIoU"
    ] == pytest.approx(ev["mIoU"])
    assert records[-1]["loss"] == pytest.approx(history[-1]["loss"])
    assert Image.open(tmp_path / "curves.png").size[0] > 0  # the curves beside metrics.jsonl
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    checkpoint = Path(saved["checkpoint"])
    assert checkpoint == tmp_path / "checkpoints" / "final" and any(checkpoint.iterdir())
    variables = load_variables(checkpoint, config)
    assert set(variables) == {"params", "batch_stats", "memory"}
    # the memory was learned
    assert float(np.abs(variables["memory"]["memory_module"]["memory"]).sum()) > 0.0
    assert (tmp_path / "config.json").exists()

    # --mode=eval reads the checkpoint back and finds the same numbers
    again = run(config, tmp_path, "eval", log=lambda message: None)
    assert again["eval"]["mIoU"] == pytest.approx(ev["mIoU"], abs=1e-6)
    assert json.loads((tmp_path / "results.json").read_text())["train"]["steps"] == 24


def test_nan_loss_stops_training_without_checkpoint(tmp_path):
    config = load_config(DEMO_CONFIG, DEMO_FAST + ["train.num_epochs=1", "train.optimizer.lr=1e30"])
    with pytest.raises(
        TrainingDiverged,
        match=r"training diverged: the loss is (nan|inf) at step \d+.*no checkpoint was written",
    ):
        run(config, tmp_path, "train", log=lambda message: None)
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "results.json").exists()


def test_checkpoints_are_never_overwritten(tmp_path):
    assert new_checkpoint_dir(tmp_path, 7) == tmp_path / "checkpoints" / "final"
    (tmp_path / "checkpoints" / "final").mkdir(parents=True)
    assert new_checkpoint_dir(tmp_path, 7) == tmp_path / "checkpoints" / "final"  # empty: usable
    (tmp_path / "checkpoints" / "final" / "x").write_text("")
    assert new_checkpoint_dir(tmp_path, 7) == tmp_path / "checkpoints" / "step_7"
    (tmp_path / "checkpoints" / "step_7").mkdir()
    (tmp_path / "checkpoints" / "step_7" / "x").write_text("")
    assert new_checkpoint_dir(tmp_path, 7) == tmp_path / "checkpoints" / "step_7_1"
    assert latest_checkpoint(tmp_path).name in ("final", "step_7")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "mcibi_jax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_rejects_unknown_key_and_real_datasets(tmp_path):
    result = _cli(
        f"--config={DEMO_CONFIG}", f"--workdir={tmp_path}", "--config.train.no_such_key=1"
    )
    assert result.returncode != 0
    assert "unknown config key 'train.no_such_key'" in result.stderr
    assert "Traceback" not in result.stderr

    missing = tmp_path / "no_dataset_here"
    result = _cli(
        f"--config={REPO / 'configs' / 'ade20k.py'}:r50",
        f"--workdir={tmp_path}",
        f"--config.dataset.root={missing}",
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr and "docs/datasets.md" in result.stderr
    assert "Traceback" not in result.stderr

    result = _cli(
        f"--config={REPO / 'configs' / 'cityscapes.py'}:r50",
        f"--workdir={tmp_path}",
        "--config.model.inference.mode=tiles",
    )
    assert result.returncode == 1
    assert "inference mode 'tiles' is unknown" in result.stderr
    assert "Traceback" not in result.stderr
