"""Atrous spatial pyramid pooling: MCIBI's context-within-image module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcibi_jax.models.layers import BatchNorm, ConvBNReLU, accumulation_dtype, conv, relu
from mcibi_jax.models.resize import resize

Array = jax.Array


class ASPP(nn.Module):
    """Parallel dilated branches + an image-level branch, fused by a 3x3 conv-BN-ReLU."""

    out_channels: int
    dilations: Sequence[int] = (1, 12, 24, 36)
    align_corners: bool = False
    negative_slope: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """(N, H, W, C) -> (N, H, W, out_channels)."""
        slope = self.negative_slope
        outputs = [
            Branch(self.out_channels, self.dilations, slope, self.dtype, name="parallel_branches")(
                x, train
            )
        ]
        outputs.append(
            ImageLevelBranch(
                self.out_channels, self.align_corners, slope, self.dtype, name="global_branch"
            )(x, train)
        )
        bottleneck = ConvBNReLU(
            self.out_channels, 3, negative_slope=slope, dtype=self.dtype, name="bottleneck"
        )
        return bottleneck(jnp.concatenate(outputs, axis=-1), train)


class Branch(nn.Module):
    """The dilated branches "0", "1", ...: 1x1 for dilation 1, else 3x3 atrous."""

    out_channels: int
    dilations: Sequence[int]
    negative_slope: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        return jnp.concatenate(
            [
                ConvBNReLU(
                    self.out_channels,
                    1 if d == 1 else 3,
                    dilation=d,
                    negative_slope=self.negative_slope,
                    dtype=self.dtype,
                    name=str(i),
                )(x, train)
                for i, d in enumerate(self.dilations)
            ],
            axis=-1,
        )


class ImageLevelBranch(nn.Module):
    """Global average pool ("0"), 1x1 conv ("1"), BN ("2"), ReLU, resized back."""

    out_channels: int
    align_corners: bool = False
    negative_slope: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        pooled = jnp.mean(x.astype(accumulation_dtype(x.dtype)), axis=(1, 2), keepdims=True).astype(
            x.dtype
        )
        pooled = conv(self.out_channels, 1, name="1", dtype=self.dtype)(pooled)
        pooled = relu(BatchNorm(dtype=self.dtype, name="2")(pooled, train), self.negative_slope)
        return resize(pooled, x.shape[1:3], "bilinear", self.align_corners)
