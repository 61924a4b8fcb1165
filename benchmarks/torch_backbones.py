"""Plain ``torch.nn`` backbones of the released MCIBI models, for vs_torch.py.

ResNet-D8, ResNeSt-D8, HRNetV2 and ViT, written from our Flax modules in
``mcibi_jax/models/backbones`` (not from the reference's code). Module names follow the released
``state_dict`` layout, so each loads its part of ``variables_to_state_dict`` with ``strict=True``.
Each returns a list of NCHW maps, one per level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}
STRIDES_AND_DILATIONS = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cout, k, stride, padding=(k - 1) // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def deep_stem(stem_channels: int) -> nn.Sequential:
    """Three 3x3 conv-BN-ReLU, the first strided (children 0-8)."""
    half = stem_channels // 2
    return nn.Sequential(
        *conv_bn(3, half, 3, 2), *conv_bn(half, half, 3), *conv_bn(half, stem_channels, 3)
    )


def stage_dilations(dilation: int, num_blocks: int) -> list[int]:
    """The first block of a dilated stage runs at half the dilation (contract_dilation)."""
    return [dilation // 2 if b == 0 and dilation > 1 else dilation for b in range(num_blocks)]


# ------------------------------------------------------------------------------------------ ResNet


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, project=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_bn(cin, planes * 4, 1, stride, relu=False) if project else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, project: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_bn(cin, planes, 1, relu=False) if project else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNetD8(nn.Module):
    """Deep 3x3 stem, max pool, four dilated bottleneck stages (output stride 8)."""

    def __init__(self, depth: int, base: int = 64, stem_channels: int | None = None):
        super().__init__()
        stem_channels = stem_channels or base
        self.stem = deep_stem(stem_channels)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = stem_channels
        strides, dilations = STRIDES_AND_DILATIONS[8]
        for i, blocks in enumerate(STAGE_BLOCKS[depth]):
            planes, stage = base * 2**i, []
            for b, d in enumerate(stage_dilations(dilations[i], blocks)):
                stride = strides[i] if b == 0 else 1
                project = b == 0 and (stride != 1 or cin != planes * 4)
                stage.append(Bottleneck(cin, planes, stride, d, project))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


# ----------------------------------------------------------------------------------------- ResNeSt


class SplitAttentionConv(nn.Module):
    """Grouped 3x3 conv into ``radix`` splits, mixed by a per-channel softmax over the splits."""

    def __init__(self, cin, channels, stride, dilation, groups, radix, reduction):
        super().__init__()
        self.channels, self.groups, self.radix = channels, groups, radix
        inter = max(cin * radix // reduction, 32)
        self.conv = nn.Conv2d(
            cin,
            channels * radix,
            3,
            stride,
            padding=dilation,
            dilation=dilation,
            groups=groups * radix,
            bias=False,
        )
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.fc1 = nn.Conv2d(channels, inter, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(inter)
        self.fc2 = nn.Conv2d(inter, channels * radix, 1, groups=groups)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv(x)))
        n, radix = x.shape[0], self.radix
        if radix > 1:
            splits = x.view(n, radix, self.channels, *x.shape[2:])  # split-major channels
            gap = splits.sum(1)
        else:
            gap = x
        gap = F.relu(self.bn1(self.fc1(gap.mean((2, 3), keepdim=True))))
        logits = self.fc2(gap)
        if radix == 1:
            return torch.sigmoid(logits) * x
        # fc2's channels are (group, split, c): softmax over the splits, then split-major
        atten = torch.softmax(logits.view(n, self.groups, radix, -1), dim=2).transpose(1, 2)
        return (atten.reshape(n, radix, self.channels, 1, 1) * splits).sum(1)


class ResNeStBottleneck(nn.Module):
    def __init__(self, cin, planes, stride, dilation, project, opts):
        super().__init__()
        groups = opts["groups"]
        width = planes
        if groups > 1:
            width = math.floor(planes * opts["base_width"] / opts["base_channels"]) * groups
        avg_after = opts["use_avg_after_block_conv2"] and stride > 1
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = SplitAttentionConv(
            width,
            width,
            1 if avg_after else stride,
            dilation,
            groups,
            opts["radix"],
            opts["reduction_factor"],
        )
        # zero padding counts in this mean (unlike the shortcut's pool)
        self.avg_pool = nn.AvgPool2d(3, stride, padding=1) if avg_after else nn.Identity()
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if project:
            pool = (
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                if stride > 1
                else nn.Identity()
            )
            self.downsample = nn.Sequential(pool, *conv_bn(cin, planes * 4, 1, relu=False))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.avg_pool(self.conv2(out))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


RESNEST_DEFAULTS = dict(
    groups=1,
    base_width=4,
    radix=2,
    reduction_factor=4,
    use_avg_after_block_conv2=True,
    base_channels=64,
    stem_channels=128,
    depth=101,
    outstride=8,
)


class ResNeStD8(nn.Module):
    """ResNeSt with the deep stem and dilated last stages (our ``ResNeSt``'s defaults)."""

    def __init__(self, **options):
        super().__init__()
        opts = {**RESNEST_DEFAULTS, **options}
        base = opts["base_channels"]
        self.stem = deep_stem(opts["stem_channels"])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        strides, dilations = STRIDES_AND_DILATIONS[opts["outstride"]]
        cin = opts["stem_channels"]
        for i, blocks in enumerate(STAGE_BLOCKS[opts["depth"]]):
            planes, stage = base * 2**i, []
            project = strides[i] != 1 or cin != planes * 4
            for b, d in enumerate(stage_dilations(dilations[i], blocks)):
                stride = strides[i] if b == 0 else 1
                stage.append(ResNeStBottleneck(cin, planes, stride, d, project and b == 0, opts))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


# ------------------------------------------------------------------------------------------- HRNet


def _res_layer(block: str, cin: int, planes: int, num_blocks: int) -> nn.Sequential:
    blocks = []
    for k in range(num_blocks):
        if block == "BOTTLENECK":
            blocks.append(Bottleneck(cin, planes, project=k == 0 and cin != planes * 4))
            cin = planes * 4
        else:
            blocks.append(BasicBlock(cin, planes, project=k == 0 and cin != planes))
            cin = planes
    return nn.Sequential(*blocks)


def _halving_chain(widths: Sequence[int], cin: int, relu_last: bool) -> nn.Sequential:
    steps = []
    for k, cout in enumerate(widths):
        steps.append(conv_bn(cin, cout, 3, 2, relu=relu_last or k < len(widths) - 1))
        cin = cout
    return nn.Sequential(*steps)


def _out_channels(stage: Mapping[str, Any]) -> list[int]:
    expansion = 4 if stage["block"] == "BOTTLENECK" else 1
    return [c * expansion for c in stage["num_channels"]]


class Transition(nn.ModuleList):
    """New branches (stride-2 chains from the last branch) and width changes (3x3 conv)."""

    def __init__(self, pre: Sequence[int], cur: Sequence[int]):
        super().__init__()
        self.sources = []
        for i, cout in enumerate(cur):
            if i < len(pre) and cout == pre[i]:
                self.sources.append(i)
                self.append(nn.Identity())
            elif i < len(pre):  # our (and the reference's) transitions read the last branch
                self.sources.append(-1)
                self.append(conv_bn(pre[-1], cout, 3))
            else:
                self.sources.append(-1)
                steps = i + 1 - len(pre)
                self.append(_halving_chain([pre[-1]] * (steps - 1) + [cout], pre[-1], True))

    def forward(self, ys):
        return [layer(ys[s]) for layer, s in zip(self, self.sources)]


class HRModule(nn.Module):
    def __init__(self, stage: Mapping[str, Any], cin: Sequence[int], multiscale: bool):
        super().__init__()
        channels = _out_channels(stage)
        self.branches = nn.ModuleList(
            _res_layer(stage["block"], cin[b], stage["num_channels"][b], stage["num_blocks"][b])
            for b in range(stage["num_branches"])
        )
        self.fuse_layers = None
        if stage["num_branches"] > 1:
            rows = []
            for i in range(stage["num_branches"] if multiscale else 1):
                row = []
                for j, cj in enumerate(channels):
                    if j == i:
                        row.append(nn.Identity())
                    elif j > i:
                        row.append(conv_bn(cj, channels[i], 1, relu=False))
                    else:
                        widths = [cj] * (i - j - 1) + [channels[i]]
                        row.append(_halving_chain(widths, cj, False))
                rows.append(nn.ModuleList(row))
            self.fuse_layers = nn.ModuleList(rows)

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        outs = []
        for i, row in enumerate(self.fuse_layers):
            total = None
            for j, (layer, x) in enumerate(zip(row, xs)):
                term = layer(x)
                if j > i:
                    # as ours: an upsampling by the scale factor, then a resize to the target
                    term = F.interpolate(
                        term, scale_factor=2 ** (j - i), mode="bilinear", align_corners=False
                    )
                    if term.shape[2:] != xs[i].shape[2:]:
                        term = F.interpolate(
                            term, size=xs[i].shape[2:], mode="bilinear", align_corners=False
                        )
                total = term if total is None else total + term
            outs.append(F.relu(total))
        return outs


class HRNetV2(nn.Module):
    """HRNetV2: the four final branches upsampled to the finest and concatenated (one level).

    ``stages``: four dicts (num_modules, num_branches, block, num_blocks, num_channels).
    """

    def __init__(self, stages: Sequence[Mapping[str, Any]], mcibi_version: bool = False):
        super().__init__()
        self.mcibi_version = mcibi_version
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        first = stages[0]
        self.layer1 = _res_layer(
            first["block"], 64, first["num_channels"][0], first["num_blocks"][0]
        )
        pre = _out_channels(first)[:1]
        for s, stage in enumerate(stages[1:], start=2):
            cur = _out_channels(stage)
            setattr(self, f"transition{s - 1}", Transition(pre, cur))
            setattr(
                self,
                f"stage{s}",
                nn.Sequential(*(HRModule(stage, cur, True) for _ in range(stage["num_modules"]))),
            )
            pre = cur
        self.num_stages = len(stages)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if not self.mcibi_version:  # MCIBI's Cityscapes variant has no ReLU here
            x = F.relu(x)
        x = F.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for s in range(2, self.num_stages + 1):
            ys = getattr(self, f"stage{s}")(getattr(self, f"transition{s - 1}")(ys))
        size = ys[0].shape[2:]
        ys = [
            y
            if y.shape[2:] == size
            else F.interpolate(y, size, mode="bilinear", align_corners=False)
            for y in ys
        ]
        return [torch.cat(ys, 1)]


# --------------------------------------------------------------------------------------------- ViT


class PatchEmbed(nn.Module):
    def __init__(self, embed_dims: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(3, embed_dims, patch_size, patch_size)

    def forward(self, x):
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))  # 'corner': bottom and right
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), x.shape[2:]


class AttentionBlock(nn.Module):
    def __init__(self, dims: int, heads: int, bias: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(dims, heads, bias=bias, batch_first=True)

    def forward(self, query, identity):
        return identity + self.attn(query, query, query, need_weights=False)[0]


class FFN(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dims, hidden), nn.GELU(), nn.Dropout(0.0)),
            nn.Linear(hidden, dims),
            nn.Dropout(0.0),
        )

    def forward(self, x, identity):
        return identity + self.layers(x)


class EncoderLayer(nn.Module):
    """Pre-norm: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))``."""

    def __init__(self, dims: int, heads: int, hidden: int, bias: bool, eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dims, eps=eps)
        self.attn = AttentionBlock(dims, heads, bias)
        self.ln2 = nn.LayerNorm(dims, eps=eps)
        self.ffn = FFN(dims, hidden)

    def forward(self, x):
        x = self.attn(self.ln1(x), x)
        return self.ffn(self.ln2(x), x)


# Options of our VisionTransformer this baseline implements only at these values.
VIT_FIXED = dict(
    patch_pad="corner",
    in_channels=3,
    out_origin=False,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.0,
    with_cls_token=True,
    output_cls_token=False,
    act_cfg={"type": "GELU"},
    patch_norm=False,
    patch_bias=True,
    pre_norm=False,
    final_norm=False,
    interpolate_mode="bilinear",
    num_fcs=2,
)


class ViT(nn.Module):
    """ViT with a class token; the token maps after the layers of ``out_indices``."""

    def __init__(
        self,
        img_size=(512, 512),
        patch_size=16,
        embed_dims=1024,
        num_layers=24,
        num_heads=16,
        mlp_ratio=4,
        out_indices=(9, 14, 19, 23),
        qkv_bias=True,
        norm_cfg=None,
        **options,
    ):
        super().__init__()
        for key, value in options.items():
            if key in VIT_FIXED and value != VIT_FIXED[key]:
                raise NotImplementedError(f"torch ViT baseline: {key}={value!r}")
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.grid = (img_h // patch_size, img_w // patch_size)
        self.out_indices = tuple(out_indices)
        eps = float((norm_cfg or {}).get("eps", 1e-6))
        self.patch_embed = PatchEmbed(embed_dims, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, embed_dims))
        hidden = int(mlp_ratio * embed_dims)
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dims, num_heads, hidden, qkv_bias, eps) for _ in range(num_layers)
        )

    def forward(self, x):
        x, (h, w) = self.patch_embed(x)
        n, _, c = x.shape
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], 1)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:  # resized only when the token counts differ, as ours
            grid = pos[:, 1:].reshape(1, *self.grid, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, (h, w), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
        x = x + pos
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.out_indices:
                outs.append(x[:, 1:].transpose(1, 2).reshape(n, c, h, w))
        return outs


# ---------------------------------------------------------------------------------------- builder


def build_backbone(options: Mapping[str, Any]) -> nn.Module:
    """The backbone of our ``config.model.backbone`` (HRNet's ``arch`` as a list of stage dicts)."""
    options = dict(options)
    kind = options.pop("type")
    for key in ("structure_type", "selected_indices", "remat", "pretrained", "use_checkpoint"):
        options.pop(key, None)
    if kind == "ResNet":
        if options.get("outstride", 8) != 8 or not options.get("use_conv3x3_stem", True):
            raise NotImplementedError("torch ResNet baseline: output stride 8, deep stem only")
        return ResNetD8(
            options["depth"], options.get("base_channels", 64), options.get("stem_channels")
        )
    if kind == "ResNeSt":
        return ResNeStD8(**options)
    if kind == "HRNet":
        if isinstance(options["arch"], str):
            raise ValueError("pass HRNet's arch as its four stage dicts")
        return HRNetV2(options["arch"], bool(options.get("mcibi_version", False)))
    if kind == "VisionTransformer":
        return ViT(**options)
    raise NotImplementedError(f"no torch baseline of backbone {kind!r}")
