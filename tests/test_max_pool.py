"""The stem's 3x3 stride-2 max pool: nn.max_pool's values, and its gradient (to the first maximum
of each window, ties included) computed without a select-and-scatter."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.layers import max_pool_3x3_s2


def flax_max_pool(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@pytest.mark.parametrize("shape", [(2, 9, 8, 3), (1, 10, 11, 4), (2, 16, 16, 5), (1, 1, 2, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradient_equal_jax_max_pool_with_ties(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.integers(-2, 2, shape), dtype)  # many ties in every window
    got, got_vjp = jax.vjp(max_pool_3x3_s2, x)
    want, want_vjp = jax.vjp(flax_max_pool, x)
    np.testing.assert_array_equal(got, want)
    # integer cotangents: every sum is exact, so the pixels that receive them must agree
    cotangent = jnp.asarray(rng.integers(-8, 8, got.shape), dtype)
    np.testing.assert_array_equal(got_vjp(cotangent)[0], want_vjp(cotangent)[0])


def test_gradient_has_no_scatter():
    x = jnp.ones((1, 8, 8, 2))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: max_pool_3x3_s2(x).sum()))(x))
    assert "scatter" not in jaxpr
