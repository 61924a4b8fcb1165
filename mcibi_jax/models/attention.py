"""Non-local (dot-product) attention between two feature maps, as MCIBI configures it."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mcibi_jax.models.cudnn_attention import fused_attention, use_fused_attention
from mcibi_jax.models.layers import (
    ConvBNReLU,
    balanced_parts,
    hold_on_cpu,
    product_precision,
    size_limit,
    softmax,
)

Array = jax.Array

# Most elements of one image's similarity matrix computed at once. MCIBI attends pixel to pixel:
# a Cityscapes crop at 1/8 resolution has 8192 pixels, i.e. 8192x8192 similarities per image and
# attention block, kept (as logits and probabilities) for the backward pass. Above this size the
# queries are processed in chunks whose similarities are recomputed in the backward pass.
MAX_ATTENTION_CHUNK_ELEMENTS = 1 << 22
# Without a backward pass nothing is kept: chunks only bound the temporaries of very large inputs
# (a whole 1024x2048 image: 32768 pixels, 4 GiB of float32 similarities per image).
MAX_EVAL_ATTENTION_CHUNK_ELEMENTS = 1 << 26
# Overrides the training limit when a model is traced (0: never in chunks), e.g. to compare both
# ways in one accelerator benchmark run (``benchmarks/accelerator.py --variants``).
ATTENTION_CHUNK_ENV = "MCIBI_ATTENTION_CHUNK_ELEMENTS"


# The attention blocks' results carry this name: a rematerialised head keeps them (recomputing
# one would run the whole attention again).
ATTENTION_OUTPUT = "attention_output"


def training_chunk_limit() -> int:
    """:data:`MAX_ATTENTION_CHUNK_ELEMENTS`, or ``MCIBI_ATTENTION_CHUNK_ELEMENTS`` when set."""
    return size_limit(ATTENTION_CHUNK_ENV, MAX_ATTENTION_CHUNK_ELEMENTS, "similarities")


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    scale: float,
    max_chunk_elements: int | None = None,
) -> Array:
    """(N, Q, C), (N, K, C), (N, K, Cv) -> (N, Q, Cv): ``softmax(scale * query key^T) value``.

    The softmax is in :func:`accumulation_dtype`; its probabilities are cast to ``value``'s
    dtype for the product. When ``Q * K`` exceeds ``max_chunk_elements`` (default
    :data:`MAX_ATTENTION_CHUNK_ELEMENTS`), the queries go through
    in chunks of at most that many similarities per image (zero rows pad the last one), one
    chunk at a time, and the backward pass recomputes each chunk's similarities instead of
    keeping them: memory linear, not quadratic, in the number of pixels. The same sums, to
    rounding (``tests/test_attention.py``); ``key``'s and ``value``'s gradients add up chunk by chunk.
    On GPUs, 16-bit operands go to cuDNN's fused attention instead, where
    :func:`~mcibi_jax.models.cudnn_attention.use_fused_attention` says so.
    """
    one_head = [x[:, :, None] for x in (query, key, value)]  # (N, L, 1, C)
    if use_fused_attention(*one_head):
        return fused_attention(*one_head, scale)[:, :, 0]
    max_chunk_elements = max_chunk_elements or MAX_ATTENTION_CHUNK_ELEMENTS
    n, num_queries, channels = query.shape
    num_keys = key.shape[1]
    rows = max(1, max_chunk_elements // max(num_keys, 1))
    if num_queries <= rows:
        return _attend(query, key, value, scale)
    num_chunks, rows = balanced_parts(num_queries, rows)
    padded = jnp.pad(query, ((0, 0), (0, num_chunks * rows - num_queries), (0, 0)))
    chunks = padded.reshape(n, num_chunks, rows, channels).swapaxes(0, 1)
    attend_chunk = jax.checkpoint(lambda q: _attend(q, key, value, scale))
    out = jax.lax.map(attend_chunk, chunks)  # (num_chunks, N, rows, Cv)
    return out.swapaxes(0, 1).reshape(n, num_chunks * rows, -1)[:, :num_queries]


def _attend(query: Array, key: Array, value: Array, scale: float) -> Array:
    logits = jnp.einsum("nqc,nkc->nqk", query, key, precision=product_precision(query, key))
    logits = logits * scale
    # On CPU, fused with the projections before and the product and out_project after, the
    # whole block became one YNNPACK kernel of 214 ms (R-50's memory head at 512x512); held,
    # the block takes 87 ms.
    attention = softmax(hold_on_cpu(logits)).astype(value.dtype)
    return jnp.einsum(
        "nqk,nkc->nqc", attention, value, precision=product_precision(attention, value)
    )


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
        limit = training_chunk_limit() if train else MAX_EVAL_ATTENTION_CHUNK_ELEMENTS
        context = dot_product_attention(query, key, value, self.transform_channels**-0.5, limit)
        context = checkpoint_name(context, ATTENTION_OUTPUT).reshape(n, h, w, -1)
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
