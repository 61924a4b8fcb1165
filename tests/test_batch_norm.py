"""Training-mode BatchNorm: the closed-form backward pass equals autodiff of the forward formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.layers import BatchNorm, batch_normalize


def _autodiff_reference(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    return (x - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias, mean, var


def test_backward_equals_autodiff_in_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 4)) * 3 + 1
    scale, bias = rng.normal(size=4), rng.normal(size=4)
    weights = [rng.normal(size=s) for s in ((2, 5, 3, 4), (4,), (4,))]

    def loss(fn, *args):
        y, mean, var = fn(*args)
        # Every output in the loss, so the statistics' cotangents are exercised too.
        return jnp.sum(y * weights[0]) + jnp.sum(mean * weights[1]) + jnp.sum(var * weights[2])

    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (x, scale, bias))
        ours = jax.grad(
            lambda *a: loss(lambda *b: batch_normalize(*b, 1e-5, jnp.float64), *a), (0, 1, 2)
        )(*args)
        want = jax.grad(lambda *a: loss(lambda *b: _autodiff_reference(*b, 1e-5), *a), (0, 1, 2))(
            *args
        )
        for got, expected in zip(ours, want):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "shape, offset, spread", [((4, 6, 6, 8), 100.0, 0.01), ((2, 1, 1, 8), 0.0, 1.0)]
)
def test_float32_stays_near_float64(shape, offset, spread):
    """Nearly constant inputs (large mean, small spread) and BatchNorm over two samples (ResNeSt's
    split attention): float32 outputs and gradients keep their digits. Before the input was centred
    first, ``x * m - mean * m`` lost three of them to cancellation."""
    rng = np.random.default_rng(1)
    # both runs see the same input
    x = (offset + spread * rng.normal(size=shape)).astype(np.float32)
    scale, bias = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    dy = rng.normal(size=shape)

    def output_and_grad(dtype):
        args = tuple(jnp.asarray(a, dtype) for a in (x, scale, bias))
        y = batch_normalize(*args, 1e-5, dtype)[0]
        grad = jax.grad(
            lambda *a: jnp.sum(batch_normalize(*a, 1e-5, dtype)[0] * jnp.asarray(dy, dtype)), (0, 1)
        )(*args)
        return [np.asarray(v, np.float64) for v in (y, *grad)]

    with jax.enable_x64(True):
        truth = output_and_grad(jnp.float64)
    for got, want in zip(output_and_grad(jnp.float32), truth):
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_module_updates_running_statistics_like_pytorch():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3, 3, 2)), jnp.float32)
    module = BatchNorm()
    variables = module.init(jax.random.PRNGKey(0), x, train=False)
    y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(
        updates["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5
    )
    want = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), want, atol=1e-5)
