"""MCIBI: DeepLabV3-style segmentor with a dataset-level feature memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from mcibi_jax.models.aspp import ASPP
from mcibi_jax.models.attention import ATTENTION_OUTPUT
from mcibi_jax.models.backbones import build_backbone
from mcibi_jax.models.conv import CONV_OUTPUT
from mcibi_jax.models.decoders import AuxiliaryDecoder, ClassifierDecoder
from mcibi_jax.models.layers import ConvBNReLU
from mcibi_jax.models.memory import MEMORY_UPDATE, MemoryModule
from mcibi_jax.models.settings import Auxiliary, Head, auxiliaries_of, head_of

Array = jax.Array

# What a rematerialised head keeps for the backward pass: its convs' outputs (which BatchNorm's
# backward pass reads anyway), the attention results and the updated memories. Everything else
# (normalised and activated maps, concatenations, dropout, the attention's inputs) is recomputed
# from them: elementwise work, no conv or attention runs twice.
HEAD_REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(
    CONV_OUTPUT, ATTENTION_OUTPUT, MEMORY_UPDATE
)


class LevelNorms(nn.Module):
    """One LayerNorm per backbone level (children "0", "1", ...), used with ViT."""

    num_levels: int
    epsilon: float

    @nn.compact
    def __call__(self, levels: Sequence[Array]) -> list[Array]:
        if len(levels) != self.num_levels:
            raise ValueError(
                f"{len(levels)} backbone levels for {self.num_levels} head norm layers"
            )
        return [
            nn.LayerNorm(epsilon=self.epsilon, use_fast_variance=False, name=str(i))(x)
            for i, x in enumerate(levels)
        ]


class AuxiliaryDecoders(nn.Module):
    """Several auxiliary heads (children "0", "1", ...) on the last levels but one."""

    configs: Sequence[Auxiliary]
    num_classes: int
    negative_slope: float
    dtype: Any = None

    @nn.compact
    def __call__(self, levels: Sequence[Array], train: bool) -> list[Array]:
        levels = list(levels)[-len(self.configs) :]
        return [
            _auxiliary_decoder(cfg, self.num_classes, self.negative_slope, self.dtype, str(i))(
                x, train
            )
            for i, (cfg, x) in enumerate(zip(self.configs, levels))
        ]


def _auxiliary_decoder(
    cfg: Auxiliary, num_classes: int, negative_slope: float, dtype: Any, name: str | None
) -> AuxiliaryDecoder:
    return AuxiliaryDecoder(
        out_channels=cfg.out_channels,
        num_classes=num_classes,
        num_convs=cfg.num_convs,
        dropout=cfg.dropout,
        upsample_scale=cfg.upsample_scale,
        negative_slope=negative_slope,
        dtype=dtype,
        name=name,
    )


class MCIBI(nn.Module):
    """The full model, built by :func:`build_model` from ``config.model`` (see ``configs/``).

    ``__call__(images (N, H, W, 3), train, labels, memory_momentum)`` returns a dict with the
    logits of both stages ``stage1``/``stage2`` (N, h, w, K) at head resolution, the
    auxiliary logits ``aux`` (a tuple, possibly empty) and, when ``labels`` (N, H, W) are
    given, ``replica_memories`` (R, K, F, C): the memory moved toward each of the
    ``num_replicas`` parts of the batch (the variable itself is left alone; the train step
    averages and stores it).
    """

    num_classes: int
    backbone: Mapping[str, Any]  # build_backbone's options, in the reference's words
    head: Head
    auxiliary: tuple[Auxiliary, ...]
    align_corners: bool
    dtype: Any = None

    def setup(self):
        head, slope = self.head, self.head.negative_slope
        self.backbone_net = build_backbone(self.backbone, dtype=self.dtype)
        if head.level_norm_channels:
            self.norm_layers = LevelNorms(len(head.level_norm_channels), head.level_norm_eps)
        if head.downsample_stride > 1:
            self.downsample_backbone = ConvBNReLU(
                head.in_channels,
                3,
                stride=head.downsample_stride,
                padding=1,
                negative_slope=slope,
                dtype=self.dtype,
            )
        if head.context_dilations:
            self.context_within_image_module = ASPP(
                head.feats_channels,
                head.context_dilations,
                self.align_corners,
                slope,
                dtype=self.dtype,
            )
        self.bottleneck = ConvBNReLU(head.feats_channels, 3, negative_slope=slope, dtype=self.dtype)
        self.memory_module = MemoryModule(
            num_classes=self.num_classes,
            feats_channels=head.feats_channels,
            transform_channels=head.transform_channels,
            out_channels=head.out_channels,
            num_feats_per_cls=head.num_feats_per_cls,
            use_context_within_image=bool(head.context_dilations),
            use_hard_aggregate=head.use_hard_aggregate,
            update_strategy=head.memory_update.strategy,
            ignore_label=head.memory_update.ignore_label,
            align_corners=self.align_corners,
            negative_slope=slope,
            dtype=self.dtype,
        )
        self.decoder_stage1 = ClassifierDecoder(
            head.feats_channels, self.num_classes, head.dropout, slope, self.dtype
        )
        self.decoder_stage2 = ClassifierDecoder(
            head.out_channels, self.num_classes, head.dropout, slope, self.dtype
        )
        if len(self.auxiliary) == 1:
            self.auxiliary_decoder = _auxiliary_decoder(
                self.auxiliary[0], self.num_classes, slope, self.dtype, None
            )
        elif len(self.auxiliary) > 1:
            self.auxiliary_decoder = AuxiliaryDecoders(
                self.auxiliary, self.num_classes, slope, self.dtype
            )

    def backbone_levels(self, images: Array, train: bool) -> list[Array]:
        """Backbone outputs picked by ``selected_indices``, normalised and downsampled."""
        outputs = self.backbone_net(images.astype(self.dtype or jnp.float32), train)
        indices = self.backbone.get("selected_indices") or tuple(range(len(outputs)))
        levels = [outputs[i] for i in indices]
        if self.head.level_norm_channels:
            levels = self.norm_layers(levels)
        if self.head.downsample_stride > 1:
            levels = [self.downsample_backbone(x, train) for x in levels]
        return levels

    def __call__(
        self,
        images: Array,
        train: bool = False,
        labels: Array | None = None,
        memory_momentum: Array | float | None = None,
        num_replicas: int = 1,
    ) -> dict[str, Any]:
        levels = self.backbone_levels(images, train)
        head = MCIBI.head_outputs
        if self.head.remat and train:
            # train and num_replicas are Python values; counted with the module as argument 0.
            head = nn.remat(head, policy=HEAD_REMAT_POLICY, static_argnums=(2, 5))
        return head(self, levels, train, labels, memory_momentum, num_replicas)

    def head_outputs(
        self,
        levels: list[Array],
        train: bool,
        labels: Array | None,
        memory_momentum: Array | float | None,
        num_replicas: int,
    ) -> dict[str, Any]:
        """Everything after the backbone: see the class docstring."""
        top = levels[-1]
        context = (
            self.context_within_image_module(top, train) if self.head.context_dilations else None
        )
        features = self.bottleneck(top, train)
        stage1 = self.decoder_stage1(features, train)
        fused, replica_memories = self.memory_module(
            features, stage1, context, train, labels, memory_momentum, num_replicas
        )
        stage2 = self.decoder_stage2(fused, train)
        aux: tuple[Array, ...] = ()
        if len(self.auxiliary) == 1:
            aux = (self.auxiliary_decoder(levels[-2], train),)
        elif len(self.auxiliary) > 1:
            aux = tuple(self.auxiliary_decoder(levels[:-1], train))
        return {
            "stage1": stage1,
            "stage2": stage2,
            "aux": aux,
            "replica_memories": replica_memories,
        }

    def classify_memory(self, memory: Array, train: bool = False) -> Array:
        """Stage-2 logits of every memory vector: (..., C) -> (prod(...), num_classes)."""
        vectors = memory.reshape(-1, 1, 1, memory.shape[-1]).astype(self.dtype or jnp.float32)
        return self.decoder_stage2(vectors, train)[:, 0, 0, :]


def build_model(model_config: Mapping[str, Any], dtype: Any = None) -> MCIBI:
    """The MCIBI module described by ``config.model`` (every key of it, see configs/common.py).

    ConfigError for a missing or unknown head / auxiliary key."""
    return MCIBI(
        num_classes=int(model_config["num_classes"]),
        backbone=_to_plain(model_config["backbone"]),
        head=head_of(model_config["head"]),
        auxiliary=auxiliaries_of(model_config["auxiliary"]),
        align_corners=bool(model_config["align_corners"]),
        dtype=dtype,
    )


def _to_plain(value: Any) -> Any:
    """ConfigDict / dict / list -> FrozenDicts and tuples, so that the module is hashable."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return FrozenDict({k: _to_plain(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_to_plain(v) for v in value)
    return value
