"""HRNet (HRNetV2) backbone in Flax, laid out like the released MCIBI checkpoints.

The network keeps one branch per resolution (1/4, 1/8, 1/16, 1/32 of the input).
Each stage is a sequence of multi-resolution modules: residual blocks run on every
branch, then every output branch sums all branches brought to its own resolution
(1x1 conv + upsampling from coarser branches, strided 3x3 convs from finer ones).
HRNetV2 returns a single map: the four final branches upsampled to the finest
resolution and concatenated along channels.

Variable tree (after the segmentor's ``backbone_net`` prefix)::

    conv1, bn1, conv2, bn2                       stem, two stride-2 3x3 convs
    layer1/<k>                                   stage 1 residual blocks
    transition<s>/<i>[/<k>]/{0,1}                branch transitions before stage s+1
    stage<s>/<m>/branches/<b>/<k>                residual blocks of module m
    stage<s>/<m>/fuse_layers/<i>/<j>[/<k>]/{0,1} the exchange from branch j to i
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcibi_jax.models.backbones.resnet import BasicBlock, Bottleneck
from mcibi_jax.models.layers import BatchNorm, ConvBNReLU, conv
from mcibi_jax.models.repeat import apply_blocks
from mcibi_jax.models.resize import resize

Array = jax.Array
Dtype = Any

EXPANSION = {"BASIC": 1, "BOTTLENECK": 4}
STEM_CHANNELS = 64
# ``scan_blocks``: a stage's identical modules (all of them, or all but a last single-output one)
# run as one jax.lax.scan. HRNet-W48's train step then compiles in 76 s instead of 180 s
# (2x256x256, CPU), but XLA's loop needs 34-94 % more temporary memory: the recipe turns it off.
SCAN_MIN_MODULES = 2


@dataclasses.dataclass(frozen=True)
class HRStage:
    """Settings of one HRNet stage (``stage1`` .. ``stage4`` of an arch).

    ``num_channels`` are per branch, before the block expansion (x4 for BOTTLENECK).
    """

    num_modules: int
    num_branches: int
    block: str  # "BASIC" or "BOTTLENECK"
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]

    def __post_init__(self):
        if self.block not in EXPANSION:
            raise ValueError(f"unknown HRNet block {self.block!r}")
        if not (len(self.num_blocks) == len(self.num_channels) == self.num_branches):
            raise ValueError(f"num_blocks/num_channels must have num_branches entries: {self}")

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(c * EXPANSION[self.block] for c in self.num_channels)


def _arch(
    width: int, blocks: int, modules: tuple[int, int, int], stem_blocks: int
) -> tuple[HRStage, ...]:
    widths = tuple(width * 2**i for i in range(4))
    return (
        HRStage(1, 1, "BOTTLENECK", (stem_blocks,), (64,)),
        HRStage(modules[0], 2, "BASIC", (blocks,) * 2, widths[:2]),
        HRStage(modules[1], 3, "BASIC", (blocks,) * 3, widths[:3]),
        HRStage(modules[2], 4, "BASIC", (blocks,) * 4, widths),
    )


ARCH_SETTINGS: dict[str, tuple[HRStage, ...]] = {
    "hrnetv2_w18_small": _arch(18, 2, (1, 3, 2), stem_blocks=2),
    "hrnetv2_w18": _arch(18, 4, (1, 4, 3), stem_blocks=4),
    "hrnetv2_w32": _arch(32, 4, (1, 4, 3), stem_blocks=4),
    "hrnetv2_w40": _arch(40, 4, (1, 4, 3), stem_blocks=4),
    "hrnetv2_w48": _arch(48, 4, (1, 4, 3), stem_blocks=4),
    # Narrow variant of the golden fixtures (inferred from their weight shapes).
    "hrnetv2_tiny": (
        HRStage(1, 1, "BOTTLENECK", (1,), (8,)),
        HRStage(1, 2, "BASIC", (1, 1), (4, 8)),
        HRStage(2, 3, "BASIC", (1, 1, 1), (4, 8, 16)),
        HRStage(2, 4, "BASIC", (1, 1, 1, 1), (4, 8, 16, 32)),
    ),
}

ArchSpec = str | Sequence[HRStage] | Mapping[str, Mapping[str, Any]]


def hrnet_stages(arch: ArchSpec) -> tuple[HRStage, ...]:
    """The four stages of ``arch``: a name of ``ARCH_SETTINGS``, a sequence of four
    ``HRStage``, or a mapping ``{"stage1": {...}, ..., "stage4": {...}}`` of the
    stages' keyword arguments (the reference's own format)."""
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f"unknown HRNet arch {arch!r}; known: {sorted(ARCH_SETTINGS)}")
        return ARCH_SETTINGS[arch]
    if isinstance(arch, Mapping):
        arch = [arch[f"stage{s}"] for s in range(1, 5)]
    stages = tuple(
        s
        if isinstance(s, HRStage)
        else HRStage(
            num_modules=s["num_modules"],
            num_branches=s["num_branches"],
            block=s["block"],
            num_blocks=tuple(s["num_blocks"]),
            num_channels=tuple(s["num_channels"]),
        )
        for s in arch
    )
    if len(stages) != 4 or stages[0].num_branches != 1:
        raise ValueError("an HRNet arch has four stages, the first with a single branch")
    return stages


def hrnet_out_channels(arch: ArchSpec, multiscale_output: bool = True) -> int:
    """Channels of the map HRNet returns (the head's ``in_channels``)."""
    channels = hrnet_stages(arch)[-1].out_channels
    return sum(channels) if multiscale_output else channels[0]


def _check_cfgs(norm_cfg: Mapping[str, Any] | None, act_cfg: Mapping[str, Any] | None) -> None:
    norm_cfg = dict(norm_cfg or {"type": "SyncBatchNorm"})
    if norm_cfg.pop("type") not in ("SyncBatchNorm", "BatchNorm2d", "BatchNorm"):
        raise NotImplementedError(f"HRNet supports batch normalisation only, got {norm_cfg}")
    if norm_cfg.get("eps", 1e-5) != 1e-5 or norm_cfg.get("momentum", 0.1) != 0.1:
        raise NotImplementedError("HRNet supports BatchNorm's default eps and momentum only")
    if act_cfg is not None and act_cfg.get("type") != "ReLU":
        raise NotImplementedError(f"HRNet supports ReLU only, got {act_cfg}")


# HRNet's residual blocks are ResNet's (stride 1, projection where the width changes).
BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


class _ResLayer(nn.Module):
    """``num_blocks`` residual blocks named "0", "1", ... (a stage-1 layer or a branch)."""

    block: str
    planes: int
    num_blocks: int
    use_checkpoint: bool = False
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        block = BLOCKS[self.block]
        if self.use_checkpoint:
            block = nn.remat(block, static_argnums=(2,))
        for k in range(self.num_blocks):
            projection = k == 0 and x.shape[-1] != self.planes * EXPANSION[self.block]
            x = block(self.planes, downsample=projection, dtype=self.dtype, name=str(k))(x, train)
        return x


class _ConvChain(nn.Module):
    """Stride-2 3x3 conv-BN(-ReLU) steps named "0", "1", ...: one halving each."""

    features: tuple[int, ...]
    activate: tuple[bool, ...]
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for k, (features, activate) in enumerate(zip(self.features, self.activate)):
            x = ConvBNReLU(features, 3, stride=2, activate=activate, dtype=self.dtype, name=str(k))(
                x, train
            )
        return x


class _Transition(nn.Module):
    """Turns the previous stage's branches into the next stage's inputs.

    Child ``i`` exists where branch i is new (a chain of stride-2 convs from the last
    branch) or changes width (a 3x3 conv-BN-ReLU); other branches pass through.
    """

    pre_channels: tuple[int, ...]
    cur_channels: tuple[int, ...]
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, ys: list[Array], train: bool) -> list[Array]:
        num_pre = len(self.pre_channels)
        xs = []
        for i, features in enumerate(self.cur_channels):
            if i < num_pre and features == self.pre_channels[i]:
                xs.append(ys[i])
            elif i < num_pre:
                # Quirk of the reference: every transition reads the last branch, even
                # for an existing branch (only the last one can change width then).
                if ys[-1].shape[-1] != self.pre_channels[i]:
                    raise ValueError(
                        "this arch changes the width of a middle branch, "
                        "which the reference HRNet cannot run either"
                    )
                xs.append(ConvBNReLU(features, 3, dtype=self.dtype, name=str(i))(ys[-1], train))
            else:
                steps = i + 1 - num_pre
                widths = (self.pre_channels[-1],) * (steps - 1) + (features,)
                chain = _ConvChain(widths, (True,) * steps, dtype=self.dtype, name=str(i))
                xs.append(chain(ys[-1], train))
        return xs


class _Branches(nn.Module):
    """The residual layers of each branch of a module, named "0", "1", ..."""

    stage: HRStage
    use_checkpoint: bool = False
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, xs: list[Array], train: bool) -> list[Array]:
        s = self.stage
        return [
            _ResLayer(
                s.block,
                s.num_channels[b],
                s.num_blocks[b],
                self.use_checkpoint,
                self.dtype,
                name=str(b),
            )(xs[b], train)
            for b in range(s.num_branches)
        ]


class _FuseRow(nn.Module):
    """Output branch ``index`` of a module: ReLU of the sum of every branch at its size.

    Child ``j`` brings branch j to branch ``index``: a 1x1 conv-BN for a coarser
    branch (followed by upsampling), a chain of strided 3x3 convs for a finer one.
    """

    index: int
    channels: tuple[int, ...]
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, xs: list[Array], train: bool) -> Array:
        i = self.index
        target = xs[i].shape[1:3]
        y = None
        for j, x in enumerate(xs):
            if j == i:
                term = x
            elif j > i:
                term = ConvBNReLU(
                    self.channels[i], 1, activate=False, dtype=self.dtype, name=str(j)
                )(x, train)
                factor = 2 ** (j - i)
                # Quirk of the reference: nn.Upsample(scale_factor) inside the fuse layer,
                # then a second bilinear resize to the target size (identity if it matches).
                term = resize(
                    term,
                    (term.shape[1] * factor, term.shape[2] * factor),
                    "bilinear",
                    False,
                    factor,
                )
                term = resize(term, target, "bilinear", False)
            else:
                steps = i - j
                widths = (self.channels[j],) * (steps - 1) + (self.channels[i],)
                activate = (True,) * (steps - 1) + (False,)
                term = _ConvChain(widths, activate, dtype=self.dtype, name=str(j))(x, train)
            y = term if y is None else y + term
        return nn.relu(y)


class _FuseLayers(nn.Module):
    """The first ``num_out`` output branches of a module, named "0", "1", ..."""

    channels: tuple[int, ...]
    num_out: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, xs: list[Array], train: bool) -> list[Array]:
        return [
            _FuseRow(i, self.channels, self.dtype, name=str(i))(xs, train)
            for i in range(self.num_out)
        ]


class _HRModule(nn.Module):
    """One multi-resolution module: ``branches`` then ``fuse_layers``."""

    stage: HRStage
    multiscale_output: bool = True
    use_checkpoint: bool = False
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, xs: list[Array], train: bool) -> list[Array]:
        xs = _Branches(self.stage, self.use_checkpoint, self.dtype, name="branches")(xs, train)
        if self.stage.num_branches == 1:
            return xs
        num_out = self.stage.num_branches if self.multiscale_output else 1
        # With remat, the exchange is recomputed too: its resampled terms (every branch at every
        # resolution) were the largest part of what HRNet kept for the backward pass.
        fuse = nn.remat(_FuseLayers, static_argnums=(2,)) if self.use_checkpoint else _FuseLayers
        return fuse(self.stage.out_channels, num_out, self.dtype, name="fuse_layers")(xs, train)


class _Stage(nn.Module):
    """``num_modules`` HR modules named "0", "1", ..."""

    stage: HRStage
    multiscale_output: bool = True
    use_checkpoint: bool = False
    dtype: Dtype | None = None
    scan_modules: bool = True

    @nn.compact
    def __call__(self, xs: list[Array], train: bool) -> list[Array]:
        count = self.stage.num_modules
        # every module but maybe the last keeps all its output branches
        same = count if self.multiscale_output else count - 1
        kwargs = dict(stage=self.stage, use_checkpoint=self.use_checkpoint, dtype=self.dtype)
        xs = apply_blocks(
            self,
            _HRModule,
            kwargs,
            [str(m) for m in range(same)],
            xs,
            train,
            scan=self.scan_modules,
            min_length=SCAN_MIN_MODULES,
        )
        if same < count:
            xs = _HRModule(**kwargs, multiscale_output=False, name=str(count - 1))(xs, train)
        return xs


class HRNet(nn.Module):
    """HRNetV2 backbone; fields mirror the reference constructor.

    ``arch`` is a name of ``ARCH_SETTINGS`` or an explicit description (see
    :func:`hrnet_stages`). ``mcibi_version`` drops the ReLU after the stem's first BN,
    as the reference does for MCIBI's Cityscapes model. ``use_checkpoint``
    rematerialises the residual blocks in the backward pass; ``scan_blocks`` runs each stage's
    identical modules as one ``jax.lax.scan`` (same parameter tree; ``SCAN_MIN_MODULES``).
    Only batch norm with PyTorch's defaults and ReLU are supported for ``norm_cfg`` /
    ``act_cfg``. The reference's ``structure_type`` and ``pretrained*`` options are not fields
    (weights come from ``mcibi_jax.porting``).

    ``__call__(x: (N, H, W, in_channels), train) -> (out,)`` with ``out`` of shape
    (N, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2), hrnet_out_channels(arch)).
    """

    arch: ArchSpec = "hrnetv2_w18_small"
    in_channels: int = 3
    norm_cfg: Mapping[str, Any] | None = None  # None: {'type': 'SyncBatchNorm'}
    multiscale_output: bool = True
    act_cfg: Mapping[str, Any] | None = None  # None: {'type': 'ReLU'}
    use_checkpoint: bool = False
    mcibi_version: bool = False
    scan_blocks: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array]:
        _check_cfgs(self.norm_cfg, self.act_cfg)
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape}")
        stages = hrnet_stages(self.arch)
        dt = self.dtype
        if dt is not None:
            x = x.astype(dt)

        x = conv(STEM_CHANNELS, 3, stride=2, name="conv1", dtype=dt)(x)
        x = BatchNorm(dtype=dt, name="bn1")(x, train)
        if not self.mcibi_version:  # MCIBI's variant skips this ReLU (reference quirk)
            x = nn.relu(x)
        x = conv(STEM_CHANNELS, 3, stride=2, name="conv2", dtype=dt)(x)
        x = nn.relu(BatchNorm(dtype=dt, name="bn2")(x, train))

        first = stages[0]
        x = _ResLayer(
            first.block,
            first.num_channels[0],
            first.num_blocks[0],
            self.use_checkpoint,
            dt,
            name="layer1",
        )(x, train)

        ys, pre_channels = [x], first.out_channels[:1]
        for s, stage in enumerate(stages[1:], start=2):
            xs = _Transition(pre_channels, stage.out_channels, dt, name=f"transition{s - 1}")(
                ys, train
            )
            multiscale = self.multiscale_output or s < len(stages)
            ys = _Stage(
                stage, multiscale, self.use_checkpoint, dt, self.scan_blocks, name=f"stage{s}"
            )(xs, train)
            pre_channels = stage.out_channels

        h = max(y.shape[1] for y in ys)
        w = max(y.shape[2] for y in ys)
        return (jnp.concatenate([resize(y, (h, w), "bilinear", False) for y in ys], axis=-1),)
