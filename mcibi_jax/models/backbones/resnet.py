"""ResNet with a 3x3 deep stem and dilated last stages (ResNet-D8 as in DeepLabV3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from mcibi_jax.models.layers import BatchNorm, conv, max_pool_3x3_s2, residual_output
from mcibi_jax.models.repeat import apply_stage

Array = jax.Array

# Per-stage (strides, dilations) for each output stride.
STRIDES_AND_DILATIONS = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}
# depth -> (block kind, blocks per stage)
ARCH_SETTINGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def stage_dilations(dilation: int, num_blocks: int, contract_dilation: bool) -> list[int]:
    """Dilation of each block of a stage; 'contract' halves the first block's."""
    dilations = [dilation] * num_blocks
    if contract_dilation and dilation > 1:
        dilations[0] = dilation // 2
    return dilations


class Downsample(nn.Module):
    """Projection shortcut: 1x1 conv ("0") + BN ("1")."""

    features: int
    stride: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = conv(self.features, 1, stride=self.stride, name="0", dtype=self.dtype)(x)
        return BatchNorm(dtype=self.dtype, name="1")(x, train)


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = conv(
            self.planes,
            3,
            stride=self.stride,
            dilation=self.dilation,
            name="conv1",
            dtype=self.dtype,
        )(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = conv(self.planes, 3, name="conv2", dtype=self.dtype)(out)
        out = BatchNorm(dtype=self.dtype, name="bn2")(out, train)
        if self.downsample:
            x = Downsample(self.planes, self.stride, self.dtype, name="downsample")(x, train)
        return residual_output(out, x)


class Bottleneck(nn.Module):
    """'pytorch' style bottleneck: the stride sits on the 3x3 conv."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out = conv(self.planes, 1, name="conv1", dtype=self.dtype)(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = conv(
            self.planes,
            3,
            stride=self.stride,
            dilation=self.dilation,
            name="conv2",
            dtype=self.dtype,
        )(out)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, train))
        out = conv(self.planes * 4, 1, name="conv3", dtype=self.dtype)(out)
        out = BatchNorm(dtype=self.dtype, name="bn3")(out, train)
        if self.downsample:
            x = Downsample(self.planes * 4, self.stride, self.dtype, name="downsample")(x, train)
        return residual_output(out, x)


class ResLayer(nn.Module):
    """One stage: blocks named "0", "1", ..."""

    block: str
    planes: int
    num_blocks: int
    stride: int
    dilation: int
    in_channels: int
    contract_dilation: bool = True
    dtype: Any = None
    use_checkpoint: bool = False
    scan_blocks: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        block_cls = Bottleneck if self.block == "bottleneck" else BasicBlock
        out_channels = self.planes * EXPANSION[self.block]
        needs_projection = self.stride != 1 or self.in_channels != out_channels
        dilations = stage_dilations(self.dilation, self.num_blocks, self.contract_dilation)
        return apply_stage(
            self,
            block_cls,
            dict(planes=self.planes, dilation=self.dilation, dtype=self.dtype),
            dict(stride=self.stride, dilation=dilations[0], downsample=needs_projection),
            self.num_blocks,
            x,
            train,
            scan=self.scan_blocks,
            remat=self.use_checkpoint,
        )


class ResNet(nn.Module):
    """ResNet backbone returning the four stage outputs (N, H/s, W/s, C) at ``out_indices``.

    ``use_checkpoint`` rematerialises every residual block in the backward pass (same numbers);
    ``scan_blocks`` runs a stage's long run of identical blocks as one scan (``models/repeat.py``).
    """

    depth: int = 101
    in_channels: int = 3
    base_channels: int = 64
    stem_channels: int = 64
    outstride: int = 8
    contract_dilation: bool = True
    use_conv3x3_stem: bool = True
    out_indices: Sequence[int] = (0, 1, 2, 3)
    dtype: Any = None
    use_checkpoint: bool = False
    scan_blocks: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, ...]:
        if self.depth not in ARCH_SETTINGS:
            raise ValueError(
                f"unsupported ResNet depth {self.depth}; choose from {sorted(ARCH_SETTINGS)}"
            )
        if self.outstride not in STRIDES_AND_DILATIONS:
            raise ValueError(f"unsupported output stride {self.outstride}; choose from 8, 16, 32")
        block, blocks_per_stage = ARCH_SETTINGS[self.depth]
        strides, dilations = STRIDES_AND_DILATIONS[self.outstride]
        if self.use_conv3x3_stem:
            half = self.stem_channels // 2
            x = DeepStem((half, half, self.stem_channels), self.dtype, name="stem")(x, train)
        else:
            x = conv(self.stem_channels, 7, stride=2, name="conv1", dtype=self.dtype)(x)
            x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        x = max_pool_3x3_s2(x)
        channels = self.stem_channels
        outputs = []
        for i in range(4):
            planes = self.base_channels * 2**i
            x = ResLayer(
                block,
                planes,
                blocks_per_stage[i],
                strides[i],
                dilations[i],
                channels,
                self.contract_dilation,
                self.dtype,
                self.use_checkpoint,
                self.scan_blocks,
                name=f"layer{i + 1}",
            )(x, train)
            channels = planes * EXPANSION[block]
            outputs.append(x)
        return tuple(outputs[i] for i in self.out_indices)


class DeepStem(nn.Module):
    """Three 3x3 conv-BN-ReLU; PyTorch names them stem.{0,1,3,4,6,7}."""

    channels: Sequence[int]
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i, features in enumerate(self.channels):
            x = conv(features, 3, stride=2 if i == 0 else 1, name=str(3 * i), dtype=self.dtype)(x)
            x = nn.relu(BatchNorm(dtype=self.dtype, name=str(3 * i + 1))(x, train))
        return x
