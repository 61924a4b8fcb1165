"""A plain ``torch.nn`` MCIBI: the PyTorch side of vs_torch.py.

Written from the model's description and our Flax modules (not from the reference's code): a
backbone of ``torch_backbones`` (ResNet-D8, ResNeSt-D8, HRNetV2, ViT), ASPP, the memory read and
its two attention blocks, the two stage decoders and the FCN auxiliary heads. Its ``state_dict`` keys are the released layout, so it
loads ``variables_to_state_dict`` of our variables with ``strict=True``. Benchmark-only:
``torch`` is an optional extra (``pip install -e '.[bench]'``), never imported by the package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_backbones import build_backbone


def conv_bn_relu(
    cin: int, cout: int, k: int, dilation: int = 1, relu: bool = True, stride: int = 1
) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    layers = [
        nn.Conv2d(cin, cout, k, stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


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


class _ReadMemory(torch.autograd.Function):
    """Each pixel's expected memory vector: the forward pass reads ``memory``, the gradient of
    the class weights uses ``gradient_memory`` (as ours: the memory after this step's update)."""

    @staticmethod
    def forward(ctx, weights, memory, gradient_memory):
        ctx.save_for_backward(gradient_memory)
        return torch.einsum("nkhw,kc->nchw", weights, memory)

    @staticmethod
    def backward(ctx, grad):
        (gradient_memory,) = ctx.saved_tensors
        return torch.einsum("nchw,kc->nkhw", grad, gradient_memory), None, None


class MemoryModule(nn.Module):
    def __init__(self, num_classes: int, channels: int, transform: int, out_channels: int):
        super().__init__()
        self.memory = nn.Parameter(torch.zeros(num_classes, 1, channels), requires_grad=False)
        self.self_attention = Attention(channels, transform, channels)
        self.bottleneck = conv_bn_relu(channels * 2, out_channels, 3)
        self.self_attention_ms = Attention(channels, transform, channels)
        self.bottleneck_ms = conv_bn_relu(channels + out_channels, out_channels, 3)

    def forward(self, feats, stage1, context, read_memory=None):
        """``read_memory``: the memory before this step's update (None: the current one)."""
        weights = torch.softmax(stage1, dim=1)
        memory = self.memory[:, 0]
        read_memory = memory if read_memory is None else read_memory
        selected = _ReadMemory.apply(weights, read_memory, memory)
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


def classifier(cin: int, channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(channels, num_classes, 1),
    )


def auxiliary_decoder(
    cin: int, channels: int, num_classes: int, num_convs=1, upsample_scale=None, dropout=0.1
) -> nn.Sequential:
    """FCN head: (3x3 conv-BN-ReLU [-nearest upsampling]) x num_convs, dropout, classifier."""
    layers = []
    for _ in range(num_convs):
        layers += [*conv_bn_relu(cin, channels, 3)]
        if upsample_scale:
            layers.append(nn.Upsample(scale_factor=upsample_scale, mode="nearest"))
        cin = channels
    return nn.Sequential(*layers, nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))


class TorchMCIBI(nn.Module):
    """MCIBI on ``backbone`` (a module returning a list of NCHW levels); inputs and logits NCHW.

    As our segmentor: the levels of ``selected_indices``, then an optional LayerNorm per level
    (``level_norm_channels``, ViT) and an optional strided 3x3 conv-BN-ReLU on each
    (``downsample_stride`` > 1, HRNet); the head reads the last level, ``auxiliary`` heads
    (dicts of ``config.model.auxiliary``) the levels before it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        in_channels: int,
        channels: int = 512,
        transform: int = 256,
        out_channels: int | None = None,
        auxiliary=(),
        selected_indices=None,
        level_norm_channels=(),
        level_norm_eps: float = 1e-6,
        downsample_stride: int = 1,
        context_dilations=(1, 12, 24, 36),
        dropout: float = 0.1,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.selected_indices = None if selected_indices is None else tuple(selected_indices)
        self.backbone_net = backbone
        if level_norm_channels:
            self.norm_layers = nn.ModuleList(
                nn.LayerNorm(c, eps=level_norm_eps) for c in level_norm_channels
            )
        if downsample_stride > 1:
            self.downsample_backbone = conv_bn_relu(
                in_channels, in_channels, 3, stride=downsample_stride
            )
        self.context_within_image_module = ASPP(in_channels, channels, tuple(context_dilations))
        self.bottleneck = conv_bn_relu(in_channels, channels, 3)
        self.memory_module = MemoryModule(num_classes, channels, transform, out_channels)
        self.decoder_stage1 = classifier(channels, channels, num_classes, dropout)
        self.decoder_stage2 = classifier(out_channels, channels, num_classes, dropout)
        heads = [
            auxiliary_decoder(
                a["in_channels"],
                a["out_channels"],
                num_classes,
                a.get("num_convs", 1),
                a.get("upsample_scale"),
                a.get("dropout", 0.1),
            )
            for a in auxiliary
        ]
        self.num_auxiliary = len(heads)
        if len(heads) == 1:
            self.auxiliary_decoder = heads[0]
        elif heads:
            self.auxiliary_decoder = nn.ModuleList(heads)

    def levels(self, images):
        outputs = self.backbone_net(images)
        indices = self.selected_indices or tuple(range(len(outputs)))
        if hasattr(self, "norm_layers"):
            levels = [
                norm(outputs[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                for norm, i in zip(self.norm_layers, indices)
            ]
        else:
            levels = [outputs[i] for i in indices]
        if hasattr(self, "downsample_backbone"):
            # HRNet selects its one output four times: downsampled once. (In training ours
            # moves this BatchNorm's running statistics once per copy; nothing here reads them.)
            done = {}
            for x in levels:
                if id(x) not in done:
                    done[id(x)] = self.downsample_backbone(x)
            levels = [done[id(x)] for x in levels]
        return levels

    def forward(self, images, labels=None, memory_momentum: float = 0.0, ignore_label: int = -100):
        levels = self.levels(images)
        top = levels[-1]
        context = self.context_within_image_module(top)
        feats = self.bottleneck(top)
        stage1 = self.decoder_stage1(feats)
        read_memory = None
        if labels is not None:
            read_memory = self.memory_module.memory[:, 0].clone()
            self.memory_module.update(feats, labels, memory_momentum, ignore_label)
        stage2 = self.decoder_stage2(self.memory_module(feats, stage1, context, read_memory))
        outputs = {"stage1": stage1, "stage2": stage2}
        if self.training:
            if self.num_auxiliary == 1:
                outputs["aux"] = [self.auxiliary_decoder(levels[-2])]
            elif self.num_auxiliary > 1:
                inputs = levels[:-1][-self.num_auxiliary :]
                outputs["aux"] = [head(x) for head, x in zip(self.auxiliary_decoder, inputs)]
            else:
                outputs["aux"] = []
        return outputs


def build_torch_mcibi(model_config) -> TorchMCIBI:
    """The PyTorch MCIBI of our ``config.model`` (a plain dict; HRNet's ``arch`` as stage dicts)."""
    head = model_config["head"]
    if head["negative_slope"] or head["use_hard_aggregate"] or head["num_feats_per_cls"] != 1:
        raise NotImplementedError("torch baseline: ReLU heads with one memory vector per class")
    if not head["context_dilations"] or model_config["align_corners"]:
        raise NotImplementedError("torch baseline: ASPP context, align_corners=False")
    return TorchMCIBI(
        build_backbone(model_config["backbone"]),
        model_config["num_classes"],
        head["in_channels"],
        head["feats_channels"],
        head["transform_channels"],
        head["out_channels"],
        auxiliary=model_config["auxiliary"],
        selected_indices=model_config["backbone"].get("selected_indices"),
        level_norm_channels=head["level_norm_channels"],
        level_norm_eps=head["level_norm_eps"],
        downsample_stride=head["downsample_stride"],
        context_dilations=head["context_dilations"],
        dropout=head["dropout"],
    )


def segmentation_loss(outputs, labels, loss_weights, ignore_label=-100):
    """Weighted cross-entropies of the logits upsampled to the labels' size.

    ``loss_weights``: ``config.model.loss_weights`` ({"stage1", "stage2", "aux": [...]}).
    """
    weighted = [
        (outputs["stage1"], loss_weights["stage1"]),
        (outputs["stage2"], loss_weights["stage2"]),
        *zip(outputs["aux"], loss_weights["aux"]),
    ]
    total = 0.0
    for logits, weight in weighted:
        logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
        total = total + weight * F.cross_entropy(logits, labels, ignore_index=ignore_label)
    return total
