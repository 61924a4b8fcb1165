"""The data an experiment reads (mcibi_jax.data.experiment_data): the synthetic scenes and a
dataset read through Grain behind one protocol, handing the loop global batches."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mcibi_jax import load_config
from mcibi_jax.config import ConfigError
from mcibi_jax.data import synthetic
from mcibi_jax.data.experiment_data import experiment_data
from mcibi_jax.data.pipeline import GrainData, GrainTraining
from mcibi_jax.sharding import batch_sharding, data_mesh
from tests.helpers import REPO

DEMO = REPO / "configs" / "demo.py"
SMALL = [
    "dataset.image_size=(16, 16)",
    "dataset.train.num_images=24",
    "dataset.test.num_images=5",
    "eval.batch_size=2",
]


def test_synthetic_training_batches_are_the_generated_ones_as_global_arrays():
    config = load_config(DEMO, SMALL)
    data = experiment_data(config)
    assert isinstance(data, synthetic.SyntheticData)
    mesh = data_mesh()
    training = data.training(mesh)
    assert (training.num_images, training.steps_per_epoch, training.image_size) == (24, 3, (16, 16))
    images, labels = synthetic.make_split(0, 24, (16, 16), 4)
    expected = list(synthetic.batches(images, labels, 8, seed=0, epoch=2, flip_prob=0.5))
    got = list(training.epoch(2, skip=1))
    assert len(got) == 2
    for batch, want in zip(got, expected[1:]):
        for key in ("images", "labels"):
            assert isinstance(batch[key], jax.Array)
            assert batch[key].sharding == batch_sharding(mesh)
            np.testing.assert_array_equal(np.asarray(batch[key]), want[key])
    # a pure function of the seed and the epoch: the state only records what made the stream
    assert training.state() == {"batch_size": 8, "num_images": 24, "seed": 0}


def test_synthetic_evaluation_and_no_test_server():
    config = load_config(DEMO, SMALL)
    data = experiment_data(config)
    batches, num_images, names = data.evaluation()
    images, labels = synthetic.make_split(1, 5, (16, 16), 4)
    batches = list(batches)
    assert num_images == 5 and names == ["background", "shape1", "shape2", "shape3"]
    assert [len(b["images"]) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), labels)
    with pytest.raises(ConfigError, match="synthetic dataset has none"):
        data.submission()


class _Scenes:
    """Three random-access samples, as a dataset reader gives them."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(int(index))
        return {
            "image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
            "label": rng.integers(0, 150, (20, 24)).astype(np.int32),
            "id": f"scene{index}",
        }


def _grain_config():
    """The ADE20K recipe cut down to 16x16 crops, one per batch."""
    return load_config(
        "configs/ade20k.py:r50",
        [
            "dataset.train.output_size=(32, 24)",
            "dataset.train.crop_size=(16, 16)",
            "dataset.train.pad_size=(16, 16)",
            "train.batch_size=1",
        ],
    )


def test_grain_training_resumes_from_its_state():
    config = _grain_config()
    assert isinstance(experiment_data(config), GrainData)
    mesh = data_mesh()
    first = GrainTraining(config, _Scenes(), mesh)
    assert (first.num_images, first.steps_per_epoch, first.image_size) == (3, 3, (16, 16))
    list(first.epoch(1))
    state = json.loads(json.dumps(first.state()))  # as the checkpoint stores it
    assert state["position"] == 3
    resumed = GrainTraining(config, _Scenes(), mesh)
    resumed.restore(state)
    for a, b in zip(first.epoch(2), resumed.epoch(2), strict=True):
        assert isinstance(a["images"], jax.Array) and a["images"].shape == (1, 16, 16, 3)
        np.testing.assert_array_equal(np.asarray(a["images"]), np.asarray(b["images"]))
        np.testing.assert_array_equal(np.asarray(a["labels"]), np.asarray(b["labels"]))
    config.train.seed = 1
    with pytest.raises(ConfigError, match="cannot resume the input pipeline of process 0"):
        GrainTraining(config, _Scenes(), mesh).restore(state)


def test_grain_training_left_early_goes_on_after_the_last_batch_taken():
    # the batches are made ahead in a thread: leaving an epoch early must not lose those
    config = _grain_config()
    mesh = data_mesh()
    expected = [np.asarray(b["images"]) for b in GrainTraining(config, _Scenes(), mesh).epoch(1)]
    training = GrainTraining(config, _Scenes(), mesh)
    batches = training.epoch(1)
    first = np.asarray(next(batches)["images"])
    batches.close()  # as the loop does when it stops at the last step
    assert training.state()["position"] == 1
    rest = [np.asarray(b["images"]) for b in training.epoch(1, skip=1)]
    assert len(rest) == 2
    for got, want in zip([first, *rest], expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert training.state()["position"] == 3
