"""Translate a configuration written in the reference's own words into ``config.model``.

The reference (sssegmentation) describes a segmentor with nested dicts (``backbone``,
``head``, ``auxiliary``, ``losses``, ``inference``). This module turns such a dict into our
model config, so that any reference config (e.g. a fixture's ``reference_config``) builds the
same network here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections


def _aux_list(auxiliary: Any) -> list[dict]:
    if not auxiliary:
        return []
    if isinstance(auxiliary, Mapping):
        auxiliary = [auxiliary]
    out = []
    for aux in auxiliary:
        upsample = aux.get("upsample") or {}
        if upsample and set(upsample) - {"scale_factor"}:
            raise ValueError(f"unsupported auxiliary upsample options {sorted(upsample)}")
        out.append(
            {
                "in_channels": aux["in_channels"],
                "out_channels": aux["out_channels"],
                "dropout": aux.get("dropout", 0.1),
                "num_convs": aux.get("num_convs", 1),
                "upsample_scale": upsample.get("scale_factor"),
            }
        )
    return out


def _loss_weight(losses: Mapping[str, Any], name: str, default: float = 0.0) -> float:
    loss = losses.get(name)
    if loss is None:
        return default
    if loss.get("type", "CrossEntropyLoss") != "CrossEntropyLoss":
        raise ValueError(f"{name}: only CrossEntropyLoss is supported, got {loss.get('type')}")
    return float(loss.get("scale_factor", 1.0))


def model_config_from_reference(ref: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``config.model`` equivalent of a reference segmentor config (MCIBI)."""
    head = ref["head"]
    downsample = head.get("downsample_backbone", {"stride": 1})
    if downsample.get("stride", 1) > 1 and (
        downsample.get("kernel_size", 3),
        downsample.get("padding", 1),
        downsample.get("bias", False),
    ) != (3, 1, False):
        raise ValueError(f"unsupported downsample_backbone {dict(downsample)}")
    context = head.get("context_within_image", {"is_on": False})
    if context.get("is_on") and context.get("type", "aspp") != "aspp":
        raise ValueError(
            f"context_within_image type {context.get('type')!r} is not supported (only 'aspp')"
        )
    norm_cfg = head.get("norm_cfg")
    update = head["update_cfg"]
    momentum = update["momentum_cfg"]
    auxiliary = _aux_list(ref.get("auxiliary"))
    losses = ref.get("losses", {})
    if len(auxiliary) == 1:
        aux_weights = [_loss_weight(losses, "loss_aux", 0.4)]
    else:
        aux_weights = [_loss_weight(losses, f"loss_aux{i + 1}", 0.4) for i in range(len(auxiliary))]
    inference = ref.get("inference", {})
    forward = inference.get("forward", {"mode": "whole"})
    tta = inference.get("tta", {})
    activation = dict(ref.get("act_cfg") or {"type": "ReLU"})
    if activation.get("type") not in ("ReLU", "LeakyReLU"):
        raise ValueError(
            f"head activation {activation.get('type')!r} is not supported (ReLU or LeakyReLU)"
        )
    negative_slope = (
        float(activation.get("negative_slope", 0.01)) if activation["type"] == "LeakyReLU" else 0.0
    )
    backbone = dict(ref["backbone"])
    backbone.pop("pretrained", None)
    # ours: activation rematerialisation, off as in the reference
    backbone.setdefault("remat", False)
    return ml_collections.ConfigDict(
        {
            "num_classes": ref["num_classes"],
            "align_corners": ref.get("align_corners", False),
            "backbone": backbone,
            "head": {
                "in_channels": head["in_channels"],
                "feats_channels": head["feats_channels"],
                "transform_channels": head["transform_channels"],
                "out_channels": head["out_channels"],
                "num_feats_per_cls": head.get("num_feats_per_cls", 1),
                "use_hard_aggregate": head.get("use_hard_aggregate", False),
                "dropout": head.get("dropout", 0.1),
                "negative_slope": negative_slope,
                "downsample_stride": downsample.get("stride", 1),
                "context_dilations": list(context["cfg"]["dilations"])
                if context.get("is_on")
                else [],
                "level_norm_channels": list(norm_cfg["in_channels_list"]) if norm_cfg else [],
                "level_norm_eps": float(norm_cfg.get("eps", 1e-5)) if norm_cfg else 1e-6,
                "use_memory_loss": bool(head.get("use_loss", False)),
                "memory_loss_weight": float(head.get("loss_cfg", {}).get("scale_factor", 1.0)),
                "memory_update": {
                    "strategy": update.get("strategy", "cosine_similarity"),
                    "ignore_label": update.get("ignore_index", -100),
                    "base_momentum": momentum["base_momentum"],
                    "base_lr": momentum["base_lr"],
                    "adjust_by_learning_rate": momentum["adjust_by_learning_rate"],
                },
                "remat": False,  # ours, as backbone.remat
            },
            "auxiliary": auxiliary,
            "loss_weights": {
                "stage1": _loss_weight(losses, "loss_cls_stage1", 0.4),
                "stage2": _loss_weight(losses, "loss_cls_stage2", 1.0),
                "aux": aux_weights,
            },
            "inference": {
                "mode": forward.get("mode", "whole"),
                "cropsize": list(forward.get("cropsize") or []),
                "stride": list(forward.get("stride") or []),
                "multiscale": list(tta.get("multiscale", [1.0])),
                "flip": bool(tta.get("flip", False)),
                "use_probs_before_resize": bool(tta.get("use_probs_before_resize", False)),
            },
        }
    )
