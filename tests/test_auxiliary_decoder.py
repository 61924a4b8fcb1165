"""AuxiliaryDecoder upsamples after its classifier: the same numbers as the reference's order
(upsample, channel dropout, 1x1 classifier), in training (dropout on) and in evaluation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.decoders import AuxiliaryDecoder
from mcibi_jax.models.layers import BatchNorm, ChannelDropout, conv, relu
from mcibi_jax.models.resize import resize


class ReferenceOrderDecoder(nn.Module):
    """The reference's order, with the same child names as AuxiliaryDecoder."""

    out_channels: int
    num_classes: int
    num_convs: int
    dropout: float
    upsample_scale: int

    @nn.compact
    def __call__(self, x, train):
        index = 0
        for _ in range(self.num_convs):
            x = conv(self.out_channels, 3, name=str(index))(x)
            x = relu(BatchNorm(name=str(index + 1))(x, train))
            size = (x.shape[1] * self.upsample_scale, x.shape[2] * self.upsample_scale)
            x = resize(x, size, "nearest")
            index += 4
        x = ChannelDropout(self.dropout)(x, train)
        return conv(self.num_classes, 1, use_bias=True, name=str(index + 1))(x)


@pytest.mark.parametrize("train", [True, False])
def test_upsampling_after_the_classifier_changes_no_number(train):
    options = dict(out_channels=6, num_classes=5, num_convs=2, dropout=0.5, upsample_scale=4)
    ours = AuxiliaryDecoder(**options)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 7)), jnp.float32)
    variables = ours.init(jax.random.PRNGKey(0), x, False)
    rngs = {"dropout": jax.random.PRNGKey(3)}

    def run(module, params, batch_stats):
        out, updates = module.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train,
            rngs=rngs,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(out)), (out, updates)

    reference = ReferenceOrderDecoder(**options)
    results = [
        jax.value_and_grad(lambda p, m=m: run(m, p, variables["batch_stats"]), has_aux=True)(
            variables["params"]
        )
        for m in (ours, reference)
    ]
    (_, (out, stats)), grads = results[0]
    (_, (want_out, want_stats)), want_grads = results[1]
    assert out.shape == (2, 48, 64, 5)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves((grads, stats)), jax.tree.leaves((want_grads, want_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
