"""The memory update alone against the reference (``memory_update.{json,npz}``)."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from mcibi_jax.models import memory
from mcibi_jax.models.memory import memory_momentum, update_memory
from mcibi_jax.models.resize import resize
from tests.reference_data import FIXTURES, nhwc, relative_error

SETTINGS = json.loads((FIXTURES / "memory_update.json").read_text())
ARRAYS = dict(np.load(FIXTURES / "memory_update.npz"))


@pytest.fixture(params=["scatter", "matmul"])
def sums_method(request, monkeypatch):
    """Both ways of summing over label pixels (the default on TPUs is ``matmul``)."""
    monkeypatch.setenv(memory.SUMS_ENV, request.param)
    return request.param


@pytest.mark.parametrize(
    "setting", SETTINGS, ids=lambda s: f"{s['index']}-{s['strategy']}-F{s['num_feats_per_cls']}"
)
def test_memory_update_matches_reference(setting, sums_method):
    i = setting["index"]
    before = ARRAYS[f"{i}/memory_before"]
    momentum = memory_momentum(setting["learning_rate"], **setting["momentum_cfg"])
    # a new function for each method: jit reuses a function's trace, whatever the environment
    update = jax.jit(functools.partial(update_memory), static_argnames=("strategy", "ignore_label"))
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


def test_absent_classes_and_ignored_pixels_leave_memory_alone():
    memory = np.random.default_rng(0).normal(size=(3, 1, 4)).astype(np.float32)
    features = np.ones((1, 2, 2, 4), np.float32)
    labels = np.array([[[0, -100], [-100, 0]]])
    after = np.asarray(update_memory(memory, features, labels, momentum=0.5))
    np.testing.assert_array_equal(after[1:], memory[1:])
    assert not np.allclose(after[0], memory[0])


def _direct_update(memory, features, labels, momentum, strategy, ignore_label):
    """The update spelled out in numpy float64 on label-resolution features (N, H, W, C), one
    class and slot at a time, as the reference's loop does it."""
    num_classes, num_feats, channels = memory.shape
    feats = features.reshape(-1, channels).astype(np.float64)
    labels = labels.reshape(-1)
    new = memory.astype(np.float64)
    for k in range(num_classes):
        mine = feats[labels == k]
        if k == ignore_label or not len(mine):
            continue
        empty = np.all(memory[k] == 0, axis=-1)
        if empty.any():
            new[k, np.argmax(empty)] = mine.mean(0)
            continue
        if strategy == "mean":
            new[k, 0] = (1 - momentum) * memory[k, 0] + momentum * mine.mean(0)
            continue
        norms = np.linalg.norm(mine, axis=1)
        slot_norms = np.linalg.norm(memory[k], axis=1)
        relation = (mine / np.maximum(norms, 1e-12)[:, None]) @ (
            memory[k] / np.maximum(slot_norms, 1e-12)[:, None]
        ).T
        slot = np.argmax(relation, axis=1)
        for f in range(num_feats):
            chosen = mine[slot == f]
            cosine = (
                chosen
                @ memory[k, f]
                / (np.maximum(np.linalg.norm(chosen, axis=1), 1e-8) * max(slot_norms[f], 1e-8))
            )
            weight = 1 - cosine
            vector = (chosen * weight[:, None]).sum(0) / weight.sum() if weight.sum() else 0.0
            new[k, f] = (1 - momentum) * memory[k, f] + momentum * vector
    return new


@pytest.mark.parametrize(
    "strategy,num_feats", [("cosine_similarity", 1), ("cosine_similarity", 3), ("mean", 1)]
)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    "low,high",
    [
        ((4, 6), (29, 45)),
        ((8, 8), (64, 64)),
        ((5, 7), (5, 7)),
        ((1, 3), (4, 11)),
        ((9, 13), (5, 7)),
    ],
    ids=["upsample", "upsample8x", "same", "one-row", "downsample"],
)
def test_update_from_low_resolution_features_equals_the_direct_update(
    strategy, num_feats, align_corners, low, high, sums_method
):
    """The update never forms the label-resolution features; in float64 it equals the update
    spelled out on them (resized first) to 1e-12, and float32 stays within 1e-5 of that."""
    rng = np.random.default_rng(sum(low) + 7 * sum(high) + num_feats)
    memory = rng.standard_normal((5, num_feats, 8))
    memory[1] = 0.0  # a class whose memory is still empty: set to its mean
    features = rng.standard_normal((2, *low, 8))
    labels = rng.integers(-1, 5, (2, *high)).astype(np.int32)
    labels[:, :, : high[1] // 4] = 255
    kwargs = dict(momentum=0.3, strategy=strategy, ignore_label=255)
    with jax.enable_x64(True):
        upsampled = np.asarray(resize(features, high, align_corners=align_corners))
        truth = _direct_update(memory, upsampled, labels, **kwargs)
        ours = update_memory(memory, features, labels, align_corners=align_corners, **kwargs)
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, truth, rtol=1e-12, atol=1e-12)
    single = update_memory(
        memory.astype(np.float32),
        features.astype(np.float32),
        labels,
        align_corners=align_corners,
        **kwargs,
    )
    assert relative_error(single, truth) < 1e-5


def test_sums_method_defaults_to_matmul_on_tpus_only(monkeypatch):
    monkeypatch.delenv(memory.SUMS_ENV, raising=False)
    assert memory.memory_sums_method("tpu") == "matmul"
    assert [memory.memory_sums_method(b) for b in ("cpu", "gpu", "cuda")] == ["scatter"] * 3
    monkeypatch.setenv(memory.SUMS_ENV, "scatter")
    assert memory.memory_sums_method("tpu") == "scatter"
    monkeypatch.setenv(memory.SUMS_ENV, "dense")
    with pytest.raises(ValueError, match="MCIBI_MEMORY_SUMS='dense': expected one of"):
        memory.memory_sums_method("cpu")


def _primitives(jaxpr) -> set[str]:
    names = set()
    for equation in jaxpr.eqns:
        names.add(equation.primitive.name)
        for param in equation.params.values():
            if hasattr(param, "jaxpr"):
                names |= _primitives(getattr(param.jaxpr, "jaxpr", param.jaxpr))
    return names


@pytest.mark.parametrize("strategy", ["cosine_similarity", "mean"])
def test_matmul_sums_scatter_nothing(strategy, monkeypatch):
    """TPUs serialise scatters; the ``matmul`` sums have none, and their only gathers pick each
    pixel's own class from short per-cell rows (the squared norms' cell lookups are products)."""
    rng = np.random.default_rng(3)
    args = (
        rng.standard_normal((5, 1, 8)).astype(np.float32),
        rng.standard_normal((2, 8, 16, 8)).astype(np.float32),
        rng.integers(0, 5, (2, 64, 128)).astype(np.int32),
    )
    primitives, results = {}, {}
    for method in ("scatter", "matmul"):
        monkeypatch.setenv(memory.SUMS_ENV, method)
        # a new function each time: JAX reuses a function's trace, whatever the environment
        update = functools.partial(update_memory, momentum=0.3, strategy=strategy)
        primitives[method] = _primitives(jax.make_jaxpr(update)(*args).jaxpr)
        results[method] = np.asarray(update(*args))
    assert "scatter-add" in primitives["scatter"]
    assert not {"scatter-add", "scatter"} & primitives["matmul"]
    np.testing.assert_allclose(results["matmul"], results["scatter"], rtol=2e-6, atol=2e-6)
