"""models/layers.residual_output and hold_when_training: values held in memory, and their
gradients behind a conditional, when training on CPU (XLA:CPU otherwise fuses a stage's whole
residual chain into every later block, and the gradient's chain into every earlier one)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.layers import hold_when_training, residual_output


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


@pytest.mark.parametrize("train", [True, False])
def test_held_values_and_gradients_are_unchanged(train):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 4)), jnp.float32)

    def loss(a, hold):
        y = jnp.tanh(a)
        return jnp.sum(jnp.cos(hold(y, train) if hold else y) * y)

    got = jax.jit(jax.value_and_grad(lambda a: loss(a, hold_when_training)))(x)
    want = jax.jit(jax.value_and_grad(lambda a: loss(a, None)))(x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_the_gradient_crosses_a_conditional_only_when_training_on_cpu():
    """XLA:CPU drops optimisation barriers before fusing the backward pass; a conditional it
    cannot remove keeps the gradient's chain out of every earlier consumer."""
    x = jnp.ones((2, 3))
    text = {
        train: str(
            jax.make_jaxpr(jax.grad(lambda a, t=train: jnp.sum(hold_when_training(a, t))))(x)
        )
        for train in (True, False)
    }
    assert ("cond" in text[True]) == (jax.default_backend() == "cpu")
    assert "cond" not in text[False]
