"""models/layers.residual_output: ReLU(out + identity), held in memory when training on CPU
(XLA:CPU otherwise fuses a stage's whole residual chain into every later block)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.layers import residual_output


@pytest.mark.parametrize("train", [True, False])
def test_values_and_gradients_are_relu_of_the_sum(train):
    rng = np.random.default_rng(0)
    out, identity = (jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.float32) for _ in range(2))

    def ours(a, b):
        return jnp.sum(jnp.sin(residual_output(a, b, train)))

    def plain(a, b):
        return jnp.sum(jnp.sin(jax.nn.relu(a + b)))

    np.testing.assert_array_equal(jax.jit(ours)(out, identity), jax.jit(plain)(out, identity))
    for got, want in zip(
        jax.jit(jax.grad(ours, (0, 1)))(out, identity),
        jax.jit(jax.grad(plain, (0, 1)))(out, identity),
    ):
        np.testing.assert_array_equal(got, want)


def test_the_barrier_is_there_only_when_training_on_cpu():
    x = jnp.ones((1, 2, 2, 1))
    text = {
        train: str(jax.make_jaxpr(lambda a, t=train: residual_output(a, a, t))(x))
        for train in (True, False)
    }
    assert ("optimization_barrier" in text[True]) == (jax.default_backend() == "cpu")
    assert "optimization_barrier" not in text[False]
