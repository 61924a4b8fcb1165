"""The memory update alone against the reference (``memory_update.{json,npz}``)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mcibi_jax.models.memory import memory_momentum, update_memory
from tests.reference_data import FIXTURES, nhwc, relative_error

SETTINGS = json.loads((FIXTURES / "memory_update.json").read_text())
ARRAYS = dict(np.load(FIXTURES / "memory_update.npz"))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['index']}-{s['strategy']}-F{s['num_feats_per_cls']}")
def test_memory_update_matches_reference(setting):
    i = setting["index"]
    before = ARRAYS[f"{i}/memory_before"]
    momentum = memory_momentum(setting["learning_rate"], **setting["momentum_cfg"])
    update = jax.jit(update_memory, static_argnames=("strategy", "ignore_label"))
    after = update(
        before, nhwc(ARRAYS[f"{i}/features_nchw"]), ARRAYS[f"{i}/labels"],
        momentum=momentum, strategy=setting["strategy"], ignore_label=setting["ignore_label"],
    )
    assert after.shape == before.shape
    assert relative_error(after, ARRAYS[f"{i}/memory_after"]) < 1e-5


def test_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown memory update strategy"):
        update_memory(np.zeros((2, 1, 4), np.float32), np.zeros((1, 2, 2, 4), np.float32), np.zeros((1, 2, 2), np.int32), momentum=0.1, strategy="median")


def test_absent_classes_and_ignored_pixels_leave_memory_alone():
    memory = np.random.default_rng(0).normal(size=(3, 1, 4)).astype(np.float32)
    features = np.ones((1, 2, 2, 4), np.float32)
    labels = np.array([[[0, -100], [-100, 0]]])
    after = np.asarray(update_memory(memory, features, labels, momentum=0.5))
    np.testing.assert_array_equal(after[1:], memory[1:])
    assert not np.allclose(after[0], memory[0])
