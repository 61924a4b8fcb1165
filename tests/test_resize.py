"""Nearest resizing: the broadcast form of integer upsampling equals indexing, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.resize import interpolation_matrix, resize


def indexed_nearest(x, size):
    rows = np.argmax(interpolation_matrix(x.shape[1], size[0], "nearest"), axis=1)
    columns = np.argmax(interpolation_matrix(x.shape[2], size[1], "nearest"), axis=1)
    return x[:, rows][:, :, columns]


@pytest.mark.parametrize(
    "shape,size",
    [
        ((2, 4, 3, 5), (16, 12)),  # x4 both ways: broadcast
        ((1, 4, 3, 2), (8, 3)),  # x2 and x1
        ((1, 4, 3, 2), (6, 7)),  # not whole multiples: indexing
        ((1, 6, 6, 2), (4, 3)),  # shrinking
    ],
)
def test_nearest_values_and_gradients(shape, size):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((shape[0], *size, shape[3])))
    np.testing.assert_array_equal(resize(x, size, "nearest"), indexed_nearest(x, size))

    def loss(f):
        return jax.grad(lambda v: jnp.sum(f(v, size) * weights))(x)

    np.testing.assert_allclose(
        loss(lambda v, s: resize(v, s, "nearest")), loss(indexed_nearest), rtol=1e-6, atol=1e-6
    )
