"""Backbones by the reference's type names; options are the reference's option names."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

# type -> (module, class)
BACKBONES = {
    "ResNet": ("mcibi_jax.models.backbones.resnet", "ResNet"),
    "ResNeSt": ("mcibi_jax.models.backbones.resnest", "ResNeSt"),
    "HRNet": ("mcibi_jax.models.backbones.hrnet", "HRNet"),
    "VisionTransformer": ("mcibi_jax.models.backbones.vit", "VisionTransformer"),
}
# Our option (not the reference's): rematerialise the backbone's blocks in the backward pass,
# trading recomputation for activation memory; it sets the backbone's ``use_checkpoint``.
REMAT_OPTION = "remat"
# Options of the reference's configs that say nothing about the computation.
IGNORED_OPTIONS = {
    "type",
    "structure_type",
    "pretrained",
    "pretrained_model_path",
    "selected_indices",
    "use_checkpoint",
}


def backbone_class(backbone_type: str) -> type[nn.Module]:
    if backbone_type not in BACKBONES:
        raise ValueError(
            f"unknown backbone type {backbone_type!r}; choose from {sorted(BACKBONES)}"
        )
    module_name, class_name = BACKBONES[backbone_type]
    return getattr(importlib.import_module(module_name), class_name)


def build_backbone(
    options: Mapping[str, Any], *, dtype: Any = None, name: str = "backbone_net"
) -> nn.Module:
    """Instantiates the backbone described by ``options`` (its ``type`` and options; ``remat``:
    activation rematerialisation per residual block / transformer layer, same numbers)."""
    cls = backbone_class(options["type"])
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    kwargs = {}
    for key, value in options.items():
        if key in IGNORED_OPTIONS:
            continue
        if key == REMAT_OPTION:
            if "use_checkpoint" not in fields:
                raise ValueError(
                    f"backbone {options['type']} cannot rematerialise (option {key!r})"
                )
            kwargs["use_checkpoint"] = bool(value)
            continue
        if key == "norm_cfg" and "norm_eps" in fields:
            kwargs["norm_eps"] = float(dict(value).get("eps", 1e-5))
            continue
        if key not in fields:
            raise ValueError(
                f"backbone {options['type']} has no option {key!r}; known options: {sorted(fields)}"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    if "dtype" in fields:
        kwargs["dtype"] = dtype
    return cls(**kwargs, name=name)
