"""ResNeSt (split-attention ResNet) with a deep stem and dilated last stages."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcibi_jax.models.backbones.resnet import stage_dilations
from mcibi_jax.models.layers import (
    BatchNorm,
    avg_pool_ceil,
    conv,
    hold_on_cpu,
    max_pool_3x3_s2,
    residual_output,
    two_pass_mean,
)
from mcibi_jax.models.repeat import apply_stage

Array = jax.Array
Dtype = Any

EXPANSION = 4
# depth -> number of bottleneck blocks per stage
ARCH_SETTINGS = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
# output stride -> (per-stage strides, per-stage dilations)
STRIDES_AND_DILATIONS = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


def avg_pool_3x3(x: Array, stride: int) -> Array:
    """``nn.AvgPool2d(3, stride, padding=1)``: floor mode, zero padding counted in the mean.

    x: (N, H, W, C) -> (N, (H - 1) // stride + 1, (W - 1) // stride + 1, C).
    """
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, stride, stride, 1), pads)
    return total / 9.0


def _sum_splits(splits: Array) -> Array:
    """(N, H, W, radix, C) -> (N, H, W, C), as adds of slices: XLA:CPU's reduce over the short
    radix axis ran 30x slower (20 ms for ResNeSt-101's 1x64x64x2x256)."""
    total = splits[..., 0, :]
    for r in range(1, splits.shape[-2]):
        total = total + splits[..., r, :]
    return total


class SplitAttentionConv(nn.Module):
    """3x3 grouped conv producing ``radix`` splits, fused by a per-channel softmax attention.

    Children: ``conv``, ``bn0``, ``fc1`` (with bias), ``bn1``, ``fc2`` (with bias).
    """

    channels: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    radix: int = 2
    reduction_factor: int = 4
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (N, H, W, Cin) -> (N, H', W', channels)."""
        radix, channels = self.radix, self.channels
        inter_channels = max(x.shape[-1] * radix // self.reduction_factor, 32)
        x = conv(
            channels * radix,
            3,
            stride=self.stride,
            dilation=self.dilation,
            padding=self.dilation,
            groups=self.groups * radix,
            name="conv",
            dtype=self.dtype,
        )(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn0")(x, train))
        if radix > 1:
            # channel c of split r sits at r * channels + c (radix-major)
            splits = x.reshape(*x.shape[:3], radix, channels)
            gap = _sum_splits(splits)
        else:
            gap = x
        gap = two_pass_mean(gap, (1, 2))
        gap = conv(
            inter_channels, 1, groups=self.groups, use_bias=True, name="fc1", dtype=self.dtype
        )(gap)
        gap = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(gap, train))
        logits = conv(
            channels * radix, 1, groups=self.groups, use_bias=True, name="fc2", dtype=self.dtype
        )(gap)
        batch = x.shape[0]
        # Held: XLA:CPU would fuse the weighted sum into the next 1x1 conv's matmul, which then
        # runs at a fifth of its speed (ResNeSt-101 layer3's conv3: 30 -> 7 ms on CPU).
        if radix == 1:
            return hold_on_cpu(jax.nn.sigmoid(logits) * x)
        # fc2's channels are ordered (group, split, c); the attention is reordered to
        # (split, group, c) so that it lines up with the splits.
        atten = jax.nn.softmax(logits.reshape(batch, self.groups, radix, -1), axis=2)
        atten = jnp.swapaxes(atten, 1, 2).reshape(batch, 1, 1, radix, channels)
        return hold_on_cpu(_sum_splits(atten * splits))


class Downsample(nn.Module):
    """Projection shortcut.

    With ``use_avg``: avg-pool (``"0"``, no params) -> 1x1 conv (``"1"``) -> BN (``"2"``);
    otherwise strided 1x1 conv (``"0"``) -> BN (``"1"``).
    """

    features: int
    stride: int
    use_avg: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (N, H, W, C) -> (N, ceil(H / stride), ceil(W / stride), features)."""
        if self.use_avg:
            # the reference keeps this Sequential (pool "0") even at stride 1, where it is a no-op
            if self.stride > 1:
                x = avg_pool_ceil(x, self.stride, self.stride)
            x = conv(self.features, 1, name="1", dtype=self.dtype)(x)
            return BatchNorm(dtype=self.dtype, name="2")(x, train)
        x = conv(self.features, 1, stride=self.stride, name="0", dtype=self.dtype)(x)
        return BatchNorm(dtype=self.dtype, name="1")(x, train)


class Bottleneck(nn.Module):
    """ResNeSt bottleneck: 1x1 -> split-attention 3x3 (-> 3x3 avg-pool when strided) -> 1x1."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    use_avg_for_downsample: bool = True
    groups: int = 1
    base_width: int = 4
    base_channels: int = 64
    radix: int = 2
    reduction_factor: int = 4
    use_avg_after_block_conv2: bool = True
    style: str = "pytorch"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (N, H, W, Cin) -> (N, ceil(H / stride), ceil(W / stride), 4 * planes)."""
        if self.style == "pytorch":
            conv1_stride, conv2_stride = 1, self.stride
        elif self.style == "caffe":
            conv1_stride, conv2_stride = self.stride, 1
        else:
            raise ValueError(f"unknown style {self.style!r}")
        if self.groups == 1:
            width = self.planes
        else:
            width = math.floor(self.planes * (self.base_width / self.base_channels)) * self.groups
        avg_after_conv2 = self.use_avg_after_block_conv2 and conv2_stride > 1

        out = conv(width, 1, stride=conv1_stride, name="conv1", dtype=self.dtype)(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = SplitAttentionConv(
            width,
            stride=1 if avg_after_conv2 else conv2_stride,
            dilation=self.dilation,
            groups=self.groups,
            radix=self.radix,
            reduction_factor=self.reduction_factor,
            dtype=self.dtype,
            name="conv2",
        )(out, train)
        if avg_after_conv2:
            # as the reference: zero padding counts in this mean (unlike the shortcut's pool)
            out = avg_pool_3x3(out, conv2_stride)
        out = conv(self.planes * EXPANSION, 1, name="conv3", dtype=self.dtype)(out)
        out = BatchNorm(dtype=self.dtype, name="bn3")(out, train)
        identity = x
        if self.downsample:
            identity = Downsample(
                self.planes * EXPANSION,
                self.stride,
                self.use_avg_for_downsample,
                dtype=self.dtype,
                name="downsample",
            )(x, train)
        return residual_output(out, identity)


class ResLayer(nn.Module):
    """One stage: bottlenecks named ``"0"``, ``"1"``, ... (a PyTorch ``nn.Sequential``)."""

    planes: int
    num_blocks: int
    stride: int = 1
    dilation: int = 1
    contract_dilation: bool = True
    block_kwargs: dict | None = None
    use_checkpoint: bool = False
    dtype: Dtype | None = None
    scan_blocks: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (N, H, W, Cin) -> (N, ceil(H / stride), ceil(W / stride), 4 * planes)."""
        dilations = stage_dilations(self.dilation, self.num_blocks, self.contract_dilation)
        needs_projection = self.stride != 1 or x.shape[-1] != self.planes * EXPANSION
        return apply_stage(
            self,
            Bottleneck,
            dict(
                planes=self.planes,
                dilation=self.dilation,
                dtype=self.dtype,
                **(self.block_kwargs or {}),
            ),
            dict(stride=self.stride, dilation=dilations[0], downsample=needs_projection),
            self.num_blocks,
            x,
            train,
            scan=self.scan_blocks,
            remat=self.use_checkpoint,
        )


class DeepStem(nn.Module):
    """Three 3x3 conv-BN-ReLU (first strided); children ``"0","1"``, ``"3","4"``, ``"6","7"``."""

    stem_channels: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (N, H, W, Cin) -> (N, ceil(H / 2), ceil(W / 2), stem_channels)."""
        half = self.stem_channels // 2
        for index, (features, stride) in enumerate(((half, 2), (half, 1), (self.stem_channels, 1))):
            x = conv(features, 3, stride=stride, name=str(3 * index), dtype=self.dtype)(x)
            x = nn.relu(BatchNorm(dtype=self.dtype, name=str(3 * index + 1))(x, train))
        return x


class ResNeSt(nn.Module):
    """ResNeSt backbone (defaults: the released ResNeSt-101, output stride 8, radix 2).

    ``use_checkpoint`` rematerialises every block in the backward pass (same numbers);
    ``scan_blocks`` runs a stage's long run of identical blocks as one scan (``models/repeat.py``).
    BatchNorm is the only normalisation and ReLU the only activation.
    """

    groups: int = 1
    base_width: int = 4
    radix: int = 2
    reduction_factor: int = 4
    use_avg_after_block_conv2: bool = True
    use_checkpoint: bool = False
    in_channels: int = 3
    base_channels: int = 64
    stem_channels: int = 128
    depth: int = 101
    outstride: int = 8
    contract_dilation: bool = True
    use_conv3x3_stem: bool = True
    style: str = "pytorch"
    out_indices: Sequence[int] = (0, 1, 2, 3)
    use_avg_for_downsample: bool = True
    dtype: Dtype | None = None
    scan_blocks: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, ...]:
        """x: (N, H, W, in_channels) -> the stage outputs selected by ``out_indices``.

        Stage i has 4 * base_channels * 2**i channels; with output stride 8 and
        H1 = ceil(ceil(H / 2) / 2), stage 0 is (N, H1, W1, .) and the others
        (N, ceil(H1 / 2), ceil(W1 / 2), .).
        """
        if self.depth not in ARCH_SETTINGS:
            raise ValueError(f"invalid depth {self.depth} for ResNeSt")
        if self.outstride not in STRIDES_AND_DILATIONS:
            raise ValueError(f"invalid outstride {self.outstride} for ResNeSt")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[-1]}")
        strides, dilations = STRIDES_AND_DILATIONS[self.outstride]
        if self.dtype is not None:
            x = x.astype(self.dtype)

        if self.use_conv3x3_stem:
            x = DeepStem(self.stem_channels, dtype=self.dtype, name="stem")(x, train)
        else:
            x = conv(self.stem_channels, 7, stride=2, name="conv1", dtype=self.dtype)(x)
            x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        x = max_pool_3x3_s2(x)

        block_kwargs = dict(
            use_avg_for_downsample=self.use_avg_for_downsample,
            groups=self.groups,
            base_width=self.base_width,
            base_channels=self.base_channels,
            radix=self.radix,
            reduction_factor=self.reduction_factor,
            use_avg_after_block_conv2=self.use_avg_after_block_conv2,
            style=self.style,
        )
        features = []
        for i, num_blocks in enumerate(ARCH_SETTINGS[self.depth]):
            x = ResLayer(
                self.base_channels * 2**i,
                num_blocks,
                stride=strides[i],
                dilation=dilations[i],
                contract_dilation=self.contract_dilation,
                block_kwargs=block_kwargs,
                use_checkpoint=self.use_checkpoint,
                dtype=self.dtype,
                scan_blocks=self.scan_blocks,
                name=f"layer{i + 1}",
            )(x, train)
            features.append(x)
        return tuple(features[i] for i in self.out_indices)
