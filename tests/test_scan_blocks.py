"""model.backbone.scan_blocks (a stage's long run of identical blocks, or HRNet's identical
modules, as one jax.lax.scan) keeps the parameter tree and the initial values; outputs, BatchNorm
statistics and gradients are those of the unrolled blocks, with and without remat, up to float32
rounding (XLA fuses the loop body's operations differently from the unrolled blocks')."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models import repeat
from mcibi_jax.models.backbones import build_backbone, hrnet, resnet

TINY = {"type": "ResNet", "depth": 18, "base_channels": 4, "stem_channels": 8}
# Third stage: the first block and just enough identical ones to be scanned; basic blocks compile
# quicker than bottlenecks. (ResNeSt's stages call the same function: the ResNeSt-101 and
# ResNet-101 fixtures of tests/test_reference_fixtures.py hold the scanned stages to the reference.)
SCANNED = repeat.SCAN_MIN_BLOCKS
FEWER_BLOCKS = ("basic", (1, 1, 1 + SCANNED, 1))
TINY_HRNET = {"type": "HRNet", "arch": "hrnetv2_tiny", "mcibi_version": True}
# name -> (options, the scanned stage, its scanned member names)
CASES = {
    "ResNet": (TINY, "layer3", [str(i) for i in range(1 + SCANNED)]),
    # hrnetv2_tiny has two modules in each of stages 3 and 4 (HRNet-W48: 4 and 3). Without
    # multiscale output the last module differs: stage 3's two are scanned, stage 4's stay unrolled.
    "HRNet": ({**TINY_HRNET, "multiscale_output": False}, "stage3", ["0", "1"]),
}
assert hrnet.SCAN_MIN_MODULES <= 2


def _has_scan(fn, *args) -> bool:
    return "scan[" in str(jax.make_jaxpr(fn)(*args))


def _train(options: dict, images: jax.Array, variables: dict):
    model = build_backbone(options)
    params, stats = variables["params"], variables["batch_stats"]

    def loss(params):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
        )
        value = sum(jnp.sum(jnp.sin(o)) for o in outputs)
        return value, (outputs, updates["batch_stats"])

    step = jax.value_and_grad(loss, has_aux=True)
    (_, (outputs, new_stats)), grads = jax.jit(step)(params)
    return outputs, new_stats, grads, _has_scan(step, params)


@pytest.mark.parametrize("case", list(CASES))
def test_scanned_blocks_compute_what_unrolled_blocks_compute(case, monkeypatch):
    monkeypatch.setitem(resnet.ARCH_SETTINGS, 18, FEWER_BLOCKS)
    options, stage, names = CASES[case]
    unrolled, scanned = {**options, "scan_blocks": False}, {**options, "scan_blocks": True}
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))

    def init(options):
        return jax.jit(build_backbone(options).init, static_argnames="train")(
            jax.random.key(0), images, train=False
        )

    variables = init(unrolled)
    same_init = init(scanned)
    assert jax.tree.structure(same_init) == jax.tree.structure(variables)
    assert all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(jax.tree.leaves(same_init), jax.tree.leaves(variables))
    )
    assert set(names) <= set(variables["params"][stage])

    def evaluate(options):
        return jax.jit(lambda v: build_backbone(options).apply(v, images, train=False))(variables)

    for a, b in zip(evaluate(unrolled), evaluate(scanned)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)

    reference = _train(unrolled, images, variables)
    assert not reference[3]
    for options in (scanned, {**scanned, "remat": True}):
        outputs, stats, grads, scanned_step = _train(options, images, variables)
        assert scanned_step
        for a, b in zip(reference[0], outputs):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
        assert jax.tree.structure(stats) == jax.tree.structure(reference[1])
        for a, b in zip(jax.tree.leaves(reference[1]), jax.tree.leaves(stats)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
        assert jax.tree.structure(grads) == jax.tree.structure(reference[2])
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(reference[2]))
        for a, b in zip(jax.tree.leaves(reference[2]), jax.tree.leaves(grads)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)


def test_short_runs_stay_unrolled():
    # ResNet-50: its longest run of identical blocks (stage 3) has 5, under SCAN_MIN_BLOCKS
    options = {"type": "ResNet", "depth": 50, "base_channels": 4, "stem_channels": 8}
    model = build_backbone({**options, "scan_blocks": True})
    images = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda k: model.init(k, images, train=False), jax.random.key(0))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    assert not _has_scan(lambda v: model.apply(v, images, train=False), variables)
