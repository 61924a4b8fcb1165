"""``mcibi_jax.train.experiment`` on a released recipe reading a (tiny, generated) dataset from disk."""

from __future__ import annotations

import json

import pytest

import mcibi_jax
from mcibi_jax.data.experiment_data import DatasetUnavailable
from mcibi_jax.train.experiment import run
from tests.test_datasets import write_ade20k


def tiny_ade20k_config(root):
    """The released ADE20K r50 recipe, narrowed so that two steps run in seconds on a CPU."""
    config = mcibi_jax.load_config("configs/ade20k.py:r50", [
        f"dataset.root={str(root)!r}",
        "dataset.train.output_size=(64, 48)", "dataset.train.crop_size=(32, 32)", "dataset.train.pad_size=(32, 32)",
        "dataset.test.output_size=(64, 48)",
        "train.batch_size=2", "train.num_replicas=2", "train.num_epochs=2", "train.log_every=1",
        "model.head.in_channels=128", "model.head.feats_channels=16", "model.head.transform_channels=8",
        "model.head.out_channels=16",
    ])
    config.model.backbone.update(base_channels=4, stem_channels=8)  # options the recipe leaves at their defaults
    config.model.auxiliary[0].update(in_channels=64, out_channels=16)
    return config


def test_trains_and_evaluates_a_released_recipe_from_disk(tmp_path):
    write_ade20k(tmp_path / "ade")
    lines = []
    results = run(tiny_ade20k_config(tmp_path / "ade"), tmp_path / "work", log=lines.append)
    assert results["train"]["steps"] == 2  # 2 training images, batch 2, 2 epochs
    assert results["eval"]["num_images"] == 1
    assert 0.0 <= results["eval"]["aAcc"] <= 100.0
    assert "wall" in results["eval"]["IoU"]  # ADE20K's class names
    assert json.loads((tmp_path / "work" / "results.json").read_text())["dataset"] == "ade20k"
    assert any(line.startswith("step 2/2") for line in lines)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetUnavailable, match="docs/datasets.md"):
        run(tiny_ade20k_config(tmp_path / "nowhere"), tmp_path / "work", log=lambda _: None)
