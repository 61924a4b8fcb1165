"""``mcibi_jax.train.experiment`` on a released recipe reading a (tiny, generated) dataset from disk."""

from __future__ import annotations

import json

import pytest

from mcibi_jax.data.experiment_data import DatasetUnavailable
from mcibi_jax.train.experiment import run
from tests.helpers import tiny_ade20k_config, write_ade20k


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
