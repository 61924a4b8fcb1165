"""Per-pixel classifiers: the two MCIBI stages and the auxiliary heads."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from mcibi_jax.models.layers import BatchNorm, ChannelDropout, conv, relu
from mcibi_jax.models.resize import resize

Array = jax.Array


class ClassifierDecoder(nn.Module):
    """1x1 conv ("0") - BN ("1") - ReLU - channel dropout - 1x1 classifier ("4")."""

    channels: int
    num_classes: int
    dropout: float = 0.1
    negative_slope: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """(N, H, W, C) -> logits (N, H, W, num_classes)."""
        x = conv(self.channels, 1, name="0", dtype=self.dtype)(x)
        x = relu(BatchNorm(dtype=self.dtype, name="1")(x, train), self.negative_slope)
        x = ChannelDropout(self.dropout)(x, train)
        return conv(self.num_classes, 1, use_bias=True, name="4", dtype=self.dtype)(x)


class AuxiliaryDecoder(nn.Module):
    """FCN-style auxiliary head on an intermediate backbone level.

    ``num_convs`` 3x3 conv-BN-ReLU (each followed by a nearest upsampling when
    ``upsample_scale`` is set, as the reference's ``nn.Upsample`` default), channel
    dropout and a 1x1 classifier. Children are numbered like the PyTorch Sequential.
    """

    out_channels: int
    num_classes: int
    num_convs: int = 1
    dropout: float = 0.1
    upsample_scale: int | None = None
    negative_slope: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        index, size = 0, None
        for _ in range(self.num_convs):
            if size is not None:
                x = resize(x, size, "nearest")
            x = conv(self.out_channels, 3, name=str(index), dtype=self.dtype)(x)
            x = relu(
                BatchNorm(dtype=self.dtype, name=str(index + 1))(x, train), self.negative_slope
            )
            index += 3
            if self.upsample_scale:
                size = (x.shape[1] * self.upsample_scale, x.shape[2] * self.upsample_scale)
                index += 1
        # The last upsampling comes after the classifier: copying pixels commutes with channel
        # dropout (one draw per image and channel) and with the 1x1 classifier, so the classifier
        # runs on scale^2 fewer pixels (ViT-L's heads: 16x), with the same numbers.
        x = ChannelDropout(self.dropout)(x, train)
        x = conv(self.num_classes, 1, use_bias=True, name=str(index + 1), dtype=self.dtype)(x)
        return x if size is None else resize(x, size, "nearest")
