"""A plain ``torch.nn`` MCIBI with a ResNet-D8 backbone: the PyTorch side of vs_torch.py.

Written from the model's description (not from the reference's code): deep-stem ResNet with
dilated last stages, ASPP, the memory read and its two attention blocks, the two stage
decoders and the FCN auxiliary head. Its ``state_dict`` keys are the released layout, so it
loads ``variables_to_state_dict`` of our variables with ``strict=True``. Benchmark-only:
``torch`` is an optional extra (``pip install -e '.[bench]'``), never imported by the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_STRIDES, STAGE_DILATIONS = (1, 2, 1, 1), (1, 1, 2, 4)  # output stride 8


def conv_bn_relu(
    cin: int, cout: int, k: int, dilation: int = 1, relu: bool = True
) -> nn.Sequential:
    layers = [
        nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int, project: bool):
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
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        else:
            self.downsample = None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNetD8(nn.Module):
    """Deep 3x3 stem, max pool, four bottleneck stages (dilations contracted in each stage's first block)."""

    def __init__(self, depth: int, base: int = 64):
        super().__init__()
        half = base // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, 2, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, 1, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, base, 3, 1, 1, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = base
        for i, blocks in enumerate(STAGE_BLOCKS[depth]):
            planes, stride, dilation = base * 2**i, STAGE_STRIDES[i], STAGE_DILATIONS[i]
            stage = []
            for b in range(blocks):
                d = dilation // 2 if b == 0 and dilation > 1 else dilation
                stage.append(Bottleneck(cin, planes, stride if b == 0 else 1, d, b == 0))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, dilations=(1, 12, 24, 36)):
        super().__init__()
        self.parallel_branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1 if d == 1 else 3, d) for d in dilations]
        )
        self.global_branch = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
        self.bottleneck = conv_bn_relu(cout * (len(dilations) + 1), cout, 3)

    def forward(self, x):
        outs = [branch(x) for branch in self.parallel_branches]
        pooled = self.global_branch(x)
        outs.append(F.interpolate(pooled, size=x.shape[2:], mode="bilinear", align_corners=False))
        return self.bottleneck(torch.cat(outs, 1))


class Attention(nn.Module):
    """Dot-product attention: queries from one map, keys and values from another."""

    def __init__(self, cin: int, transform: int, cout: int):
        super().__init__()
        self.transform = transform
        self.query_project = nn.Sequential(
            conv_bn_relu(cin, transform, 1), conv_bn_relu(transform, transform, 1)
        )
        self.key_project = nn.Sequential(
            conv_bn_relu(cin, transform, 1), conv_bn_relu(transform, transform, 1)
        )
        self.value_project = conv_bn_relu(cin, transform, 1)
        self.out_project = conv_bn_relu(transform, cout, 1)

    def forward(self, query_feats, key_feats):
        n, _, h, w = query_feats.shape
        q = self.query_project(query_feats).flatten(2).transpose(1, 2)
        k = self.key_project(key_feats).flatten(2)
        v = self.value_project(key_feats).flatten(2).transpose(1, 2)
        attention = torch.softmax(torch.bmm(q, k) * self.transform**-0.5, dim=-1)
        context = torch.bmm(attention, v).transpose(1, 2).reshape(n, -1, h, w)
        return self.out_project(context)


class MemoryModule(nn.Module):
    def __init__(self, num_classes: int, channels: int, transform: int):
        super().__init__()
        self.memory = nn.Parameter(torch.zeros(num_classes, 1, channels), requires_grad=False)
        self.self_attention = Attention(channels, transform, channels)
        self.bottleneck = conv_bn_relu(channels * 2, channels, 3)
        self.self_attention_ms = Attention(channels, transform, channels)
        self.bottleneck_ms = conv_bn_relu(channels * 2, channels, 3)

    def forward(self, feats, stage1, context):
        weights = torch.softmax(stage1, dim=1)
        selected = torch.einsum("nkhw,kc->nchw", weights, self.memory[:, 0])
        out = self.bottleneck(torch.cat([feats, self.self_attention(feats, selected)], 1))
        context = self.self_attention_ms(feats, context)
        return self.bottleneck_ms(torch.cat([context, out], 1))

    @torch.no_grad()
    def update(self, feats, labels, momentum: float, ignore_label: int):
        """Moves each present class's vector toward its cosine-dissimilarity-weighted mean feature."""
        feats = F.interpolate(feats, size=labels.shape[1:], mode="bilinear", align_corners=False)
        feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        labels = labels.reshape(-1)
        for k in labels.unique().tolist():
            if k == ignore_label or not 0 <= k < self.memory.shape[0]:
                continue
            f = feats[labels == k]
            m = self.memory[k, 0]
            if torch.all(m == 0):
                self.memory[k, 0] = f.mean(0)
                continue
            weight = 1 - F.cosine_similarity(f, m[None], dim=1)
            batch_vector = (f * weight[:, None]).sum(0) / weight.sum().clamp_min(1e-12)
            self.memory[k, 0] = (1 - momentum) * m + momentum * batch_vector


def classifier(cin: int, channels: int, num_classes: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, channels, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.1),
        nn.Conv2d(channels, num_classes, 1),
    )


class TorchMCIBI(nn.Module):
    """MCIBI with a ResNet-``depth``-D8 backbone; inputs and logits NCHW."""

    def __init__(
        self,
        depth: int = 50,
        num_classes: int = 19,
        channels: int = 512,
        transform: int = 256,
        base: int = 64,
        aux_channels: int = 512,
    ):
        super().__init__()
        self.backbone_net = ResNetD8(depth, base)
        self.context_within_image_module = ASPP(base * 32, channels)
        self.bottleneck = conv_bn_relu(base * 32, channels, 3)
        self.memory_module = MemoryModule(num_classes, channels, transform)
        self.decoder_stage1 = classifier(channels, channels, num_classes)
        self.decoder_stage2 = classifier(channels, channels, num_classes)
        self.auxiliary_decoder = classifier(base * 16, aux_channels, num_classes, k=3)

    def forward(self, images, labels=None, memory_momentum: float = 0.0, ignore_label: int = -100):
        levels = self.backbone_net(images)
        top = levels[-1]
        context = self.context_within_image_module(top)
        feats = self.bottleneck(top)
        stage1 = self.decoder_stage1(feats)
        if labels is not None:
            self.memory_module.update(feats, labels, memory_momentum, ignore_label)
        stage2 = self.decoder_stage2(self.memory_module(feats, stage1, context))
        if not self.training:
            return {"stage1": stage1, "stage2": stage2}
        return {"stage1": stage1, "stage2": stage2, "aux": self.auxiliary_decoder(levels[-2])}


def segmentation_loss(
    outputs, labels, weights=(("stage1", 0.4), ("stage2", 1.0), ("aux", 0.4)), ignore_label=-100
):
    """Weighted cross-entropies of the logits upsampled to the labels' size."""
    total = 0.0
    for key, weight in weights:
        logits = F.interpolate(
            outputs[key], size=labels.shape[1:], mode="bilinear", align_corners=False
        )
        total = total + weight * F.cross_entropy(logits, labels, ignore_index=ignore_label)
    return total
