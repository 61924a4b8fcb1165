"""Non-local (dot-product) attention between two feature maps, as MCIBI configures it."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcibi_jax.models.layers import ConvBNReLU, hold_on_cpu, softmax

Array = jax.Array


class SelfAttentionBlock(nn.Module):
    """Queries come from ``query_feats``, keys and values from ``key_feats``.

    Key/query projections have two conv-BN-ReLU layers, value and output one each; the
    similarity is scaled by ``transform_channels ** -0.5``.
    """

    transform_channels: int
    out_channels: int
    negative_slope: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, query_feats: Array, key_feats: Array, train: bool) -> Array:
        """(N, H, W, Cq), (N, H', W', Ck) -> (N, H, W, out_channels)."""
        n, h, w, _ = query_feats.shape
        kwargs = dict(negative_slope=self.negative_slope, dtype=self.dtype)
        query = TwoLayerProjection(self.transform_channels, **kwargs, name="query_project")(
            query_feats, train
        )
        key = TwoLayerProjection(self.transform_channels, **kwargs, name="key_project")(
            key_feats, train
        )
        value = ConvBNReLU(self.transform_channels, 1, **kwargs, name="value_project")(
            key_feats, train
        )
        query = query.reshape(n, h * w, -1)
        key = key.reshape(n, -1, key.shape[-1])
        value = value.reshape(n, -1, value.shape[-1])
        logits = (
            jnp.einsum("nqc,nkc->nqk", query, key, precision="highest")
            * self.transform_channels**-0.5
        )
        # On CPU, fused with the projections before and the product and out_project after, the
        # whole block became one YNNPACK kernel of 214 ms (R-50's memory head at 512x512); held,
        # the block takes 87 ms.
        attention = softmax(hold_on_cpu(logits)).astype(value.dtype)
        context = jnp.einsum("nqk,nkc->nqc", attention, value, precision="highest").reshape(
            n, h, w, -1
        )
        return ConvBNReLU(self.out_channels, 1, **kwargs, name="out_project")(context, train)


class TwoLayerProjection(nn.Module):
    """Two 1x1 conv-BN-ReLU layers named "0" and "1"."""

    features: int
    negative_slope: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i in range(2):
            x = ConvBNReLU(
                self.features, 1, negative_slope=self.negative_slope, dtype=self.dtype, name=str(i)
            )(x, train)
        return x
