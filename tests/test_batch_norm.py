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


def _reductions(fn, *args) -> int:
    from tests.helpers import jaxpr_equations

    return sum(e.primitive.name == "reduce_sum" for e in jaxpr_equations(jax.make_jaxpr(fn)(*args)))


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (40.0, 2.0), (-300.0, 8.0)])
def test_bfloat16_statistics_in_one_pass_keep_float32_digits(offset, spread):
    """bfloat16 inputs: mean and variance from one pass of shifted sums, close to float64's
    statistics of the same bfloat16 values even far from zero; the output and gradients match
    the float32 path's to bfloat16 rounding."""
    rng = np.random.default_rng(3)
    shape = (2, 16, 16, 8)
    x = jnp.asarray(offset + spread * rng.normal(size=shape), jnp.bfloat16)
    scale = jnp.asarray(rng.normal(size=8), jnp.float32)
    bias = jnp.asarray(rng.normal(size=8), jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    y, mean, var = batch_normalize(x, scale, bias, 1e-5, jnp.bfloat16)
    exact = np.asarray(x, np.float64).reshape(-1, 8)
    np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-6, atol=1e-6 * spread)
    np.testing.assert_allclose(var, exact.var(0), rtol=1e-5)

    def grads(dtype):
        def loss(x, scale, bias):
            out = batch_normalize(x.astype(dtype), scale, bias, 1e-5, dtype)[0]
            return jnp.sum(out.astype(jnp.float32) * dy.astype(jnp.float32))

        return jax.grad(loss, (0, 1, 2))(x, scale, bias)

    y32 = batch_normalize(x.astype(jnp.float32), scale, bias, 1e-5, jnp.float32)[0]
    np.testing.assert_allclose(
        np.asarray(y, np.float32), y32, atol=0.04 * float(jnp.abs(y32).max())
    )
    for got, want in zip(grads(jnp.bfloat16), grads(jnp.float32)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_bfloat16_reads_the_activations_fewer_times():
    """Each reduction is a pass over the activations on an accelerator: bfloat16's forward has
    two sums over one shifted input (float32's: three, each after the last), and its backward
    no re-centring of the input gradient."""
    x = jnp.zeros((2, 4, 4, 8))
    scale, bias = jnp.ones(8), jnp.zeros(8)

    def forward(dtype):
        return lambda x: batch_normalize(x.astype(dtype), scale, bias, 1e-5, dtype)[0]

    def backward(dtype):
        return jax.grad(lambda x: jnp.sum(forward(dtype)(x).astype(jnp.float32)))

    assert _reductions(forward(jnp.float32), x) == 3
    assert _reductions(forward(jnp.bfloat16), x) == 2
    # forward's, then the backward's (bias and scale gradients, the re-centring), the loss's sum
    assert _reductions(backward(jnp.float32), x) == 3 + 3 + 1
    assert _reductions(backward(jnp.bfloat16), x) == 2 + 2 + 1
