"""models/layers.hold_on_cpu and residual_output: on CPU a residual stream goes through a
conditional XLA cannot fuse across, forward and backward (XLA:CPU otherwise fuses a stage's
whole residual chain into every later block, and the gradient's chain into every earlier one)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax.models.layers import hold_on_cpu, residual_output


def test_residual_output_values_and_gradients_are_relu_of_the_sum():
    rng = np.random.default_rng(0)
    out, identity = (jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.float32) for _ in range(2))

    def ours(a, b):
        return jnp.sum(jnp.sin(residual_output(a, b)))

    def plain(a, b):
        return jnp.sum(jnp.sin(jax.nn.relu(a + b)))

    np.testing.assert_array_equal(jax.jit(ours)(out, identity), jax.jit(plain)(out, identity))
    for got, want in zip(
        jax.jit(jax.grad(ours, (0, 1)))(out, identity),
        jax.jit(jax.grad(plain, (0, 1)))(out, identity),
    ):
        np.testing.assert_array_equal(got, want)


def test_held_values_and_gradients_are_unchanged():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 4)), jnp.float32)

    def loss(a, hold):
        y = jnp.tanh(a)
        return jnp.sum(jnp.cos(hold(y)) * y)

    got = jax.jit(jax.value_and_grad(lambda a: loss(a, hold_on_cpu)))(x)
    want = jax.jit(jax.value_and_grad(lambda a: loss(a, lambda y: y)))(x)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_value_and_gradient_cross_a_conditional_on_cpu_only():
    """XLA:CPU drops optimisation barriers before it fuses; a conditional whose predicate is
    known only at run time stays, in the forward pass and in its transpose."""
    x = jnp.ones((2, 3))
    on_cpu = jax.default_backend() == "cpu"
    forward = jax.jit(hold_on_cpu).lower(x).compile().as_text()
    backward = jax.jit(jax.grad(lambda a: jnp.sum(hold_on_cpu(a) ** 2))).lower(x).compile()
    assert ("conditional" in forward) == on_cpu
    assert ("conditional" in backward.as_text()) == on_cpu


def test_each_loss_holds_its_logits_on_cpu():
    """The classifiers' matmul stays out of the log-softmax's fusion (segmentation_losses)."""
    from mcibi_jax.train.losses import segmentation_losses

    logits = jnp.zeros((1, 4, 4, 3))
    labels = jnp.zeros((1, 8, 8), jnp.int32)
    outputs = {"stage1": logits, "stage2": logits, "aux": (logits,)}
    weights = {"stage1": 1.0, "stage2": 1.0, "aux": (0.4,)}
    hlo = (
        jax.jit(lambda o: segmentation_losses(o, labels, weights))
        .lower(outputs)
        .compiler_ir("hlo")
        .as_hlo_text()
    )
    assert hlo.count("conditional(") == (3 if jax.default_backend() == "cpu" else 0)


def test_attention_holds_its_logits_on_cpu():
    """The attention logits stay out of one fusion with the projections and the product
    (models/attention.py): the block's HLO has one conditional on CPU, none elsewhere."""
    from mcibi_jax.models.attention import SelfAttentionBlock

    block = SelfAttentionBlock(transform_channels=4, out_channels=6)
    feats = jnp.zeros((1, 3, 3, 5))
    variables = block.init(jax.random.key(0), feats, feats, False)
    hlo = (
        jax.jit(lambda v: block.apply(v, feats, feats, False))
        .lower(variables)
        .compiler_ir("hlo")
        .as_hlo_text()
    )
    assert hlo.count("conditional(") == (1 if jax.default_backend() == "cpu" else 0)
