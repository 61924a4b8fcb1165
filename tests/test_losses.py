"""cross_entropy's program: the same numbers as a gather of the label's log-probability, without
a scatter in its gradient (a scatter-add runs on atomics on GPUs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax.train.losses import cross_entropy


def gathered_cross_entropy(logits, labels, ignore_label):
    valid = labels != ignore_label
    in_range = valid & (labels >= 0) & (labels < logits.shape[-1])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, jnp.where(in_range, labels, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(in_range, nll, 0.0)) / jnp.sum(valid)


def test_cross_entropy_equals_the_gather_and_its_gradient_has_no_scatter():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 6, 7, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(-1, 7, (2, 6, 7)), jnp.int32)  # -1, 5, 6: out of range
    labels = labels.at[0, 0, 0].set(255)

    got, got_grad = jax.value_and_grad(cross_entropy)(logits, labels, 255)
    want, want_grad = jax.value_and_grad(gathered_cross_entropy)(logits, labels, 255)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(got_grad, want_grad)

    jaxpr = str(jax.make_jaxpr(jax.grad(cross_entropy))(logits, labels, 255))
    assert "scatter" not in jaxpr and "gather" not in jaxpr
