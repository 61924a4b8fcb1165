"""The memory update alone against the reference (``memory_update.{json,npz}``)."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from mcibi_jax.models.memory import (
    SEGMENT_SUMS,
    SEGMENT_SUMS_ENV,
    memory_momentum,
    segment_sums_method,
    update_memory,
)
from tests.reference_data import FIXTURES, nhwc, relative_error

SETTINGS = json.loads((FIXTURES / "memory_update.json").read_text())
ARRAYS = dict(np.load(FIXTURES / "memory_update.npz"))


@pytest.mark.parametrize("segment_sums", SEGMENT_SUMS)
@pytest.mark.parametrize(
    "setting", SETTINGS, ids=lambda s: f"{s['index']}-{s['strategy']}-F{s['num_feats_per_cls']}"
)
def test_memory_update_matches_reference(setting, segment_sums):
    i = setting["index"]
    before = ARRAYS[f"{i}/memory_before"]
    momentum = memory_momentum(setting["learning_rate"], **setting["momentum_cfg"])
    update = jax.jit(
        functools.partial(update_memory, segment_sums=segment_sums),
        static_argnames=("strategy", "ignore_label"),
    )
    after = update(
        before,
        nhwc(ARRAYS[f"{i}/features_nchw"]),
        ARRAYS[f"{i}/labels"],
        momentum=momentum,
        strategy=setting["strategy"],
        ignore_label=setting["ignore_label"],
    )
    assert after.shape == before.shape
    assert relative_error(after, ARRAYS[f"{i}/memory_after"]) < 1e-5


def test_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown memory update strategy"):
        update_memory(
            np.zeros((2, 1, 4), np.float32),
            np.zeros((1, 2, 2, 4), np.float32),
            np.zeros((1, 2, 2), np.int32),
            momentum=0.1,
            strategy="median",
        )


def test_segment_sums_method_from_the_environment(monkeypatch):
    monkeypatch.delenv(SEGMENT_SUMS_ENV, raising=False)
    assert segment_sums_method() == "scatter"
    monkeypatch.setenv(SEGMENT_SUMS_ENV, "matmul")
    assert segment_sums_method() == "matmul" and segment_sums_method("scatter") == "scatter"
    with pytest.raises(ValueError, match="unknown segment_sums 'sort'"):
        segment_sums_method("sort")


@pytest.mark.parametrize(
    "strategy,num_feats", [("cosine_similarity", 1), ("cosine_similarity", 3), ("mean", 1)]
)
def test_matmul_segment_sums_equal_the_scatter(strategy, num_feats):
    rng = np.random.default_rng(1)
    memory = rng.standard_normal((7, num_feats, 16)).astype(np.float32)
    memory[2] = 0.0
    features = rng.standard_normal((2, 5, 7, 16)).astype(np.float32)
    labels = rng.integers(-1, 7, (2, 20, 28)).astype(np.int32)
    labels[0, :4] = 255
    updated = [
        update_memory(
            memory,
            features,
            labels,
            momentum=0.2,
            strategy=strategy,
            ignore_label=255,
            band_values=2 * 28 * 16 * 3,
            segment_sums=method,
        )
        for method in SEGMENT_SUMS
    ]
    np.testing.assert_allclose(updated[1], updated[0], rtol=1e-5, atol=1e-6)


def test_absent_classes_and_ignored_pixels_leave_memory_alone():
    memory = np.random.default_rng(0).normal(size=(3, 1, 4)).astype(np.float32)
    features = np.ones((1, 2, 2, 4), np.float32)
    labels = np.array([[[0, -100], [-100, 0]]])
    after = np.asarray(update_memory(memory, features, labels, momentum=0.5))
    np.testing.assert_array_equal(after[1:], memory[1:])
    assert not np.allclose(after[0], memory[0])


@pytest.mark.parametrize(
    "strategy,num_feats", [("cosine_similarity", 1), ("cosine_similarity", 3), ("mean", 1)]
)
@pytest.mark.parametrize("align_corners", [False, True])
def test_banded_update_equals_the_update_of_the_upsampled_features(
    strategy, num_feats, align_corners
):
    from mcibi_jax.models.resize import resize

    rng = np.random.default_rng(0)
    memory = rng.standard_normal((5, num_feats, 8)).astype(np.float32)
    memory[1] = 0.0  # a class whose memory is still empty: set to its mean
    low = rng.standard_normal((2, 4, 6, 8)).astype(np.float32)
    labels = rng.integers(-1, 5, (2, 29, 45)).astype(np.int32)  # 29 rows: the last band is padded
    labels[:, :, :10] = 255
    kwargs = dict(momentum=0.3, strategy=strategy, ignore_label=255)
    whole = update_memory(
        memory,
        resize(low, (29, 45), align_corners=align_corners),
        labels,
        band_values=10**9,
        **kwargs,
    )
    for band_values in (2 * 45 * 8 * 3, 2 * 45 * 8, 1):  # 3 rows, 1 row, at least 1 row per band
        banded = update_memory(
            memory, low, labels, align_corners=align_corners, band_values=band_values, **kwargs
        )
        np.testing.assert_allclose(banded, whole, rtol=2e-5, atol=2e-6)
        # features already at the labels' size are cut into bands without resampling
        same = update_memory(
            memory,
            resize(low, (29, 45), align_corners=align_corners),
            labels,
            band_values=band_values,
            **kwargs,
        )
        np.testing.assert_allclose(same, whole, rtol=2e-5, atol=2e-6)
