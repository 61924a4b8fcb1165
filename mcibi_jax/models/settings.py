"""Typed views of ``config.model``'s head and auxiliary heads, built once by ``build_model``.

Every value comes from the config (``configs/common.py`` holds the defaults), and a missing or
unknown key is a one-line ConfigError; only options added after configs were first saved (e.g.
in WORKDIR/config.json) have a default here: what those older configs meant.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Mapping
from typing import Any

from mcibi_jax.config import ConfigError

# Keys earlier versions wrote (e.g. in WORKDIR/config.json) -> today's name.
RENAMED_HEAD_KEYS = {"update": "memory_update"}


@dataclasses.dataclass(frozen=True)
class MemoryUpdate:
    """``model.head.memory_update``: how the memory moves toward each batch's class features."""

    strategy: str  # 'cosine_similarity' or 'mean'
    ignore_label: int
    base_momentum: float
    base_lr: float
    adjust_by_learning_rate: bool  # momentum = base_momentum * lr_t / base_lr


@dataclasses.dataclass(frozen=True)
class Head:
    """``model.head``: the MCIBI head."""

    in_channels: int
    feats_channels: int
    transform_channels: int
    out_channels: int
    num_feats_per_cls: int
    use_hard_aggregate: bool
    dropout: float
    negative_slope: float
    downsample_stride: int
    context_dilations: tuple[int, ...]
    level_norm_channels: tuple[int, ...]
    level_norm_eps: float
    use_memory_loss: bool
    memory_loss_weight: float
    memory_update: MemoryUpdate
    # ours: rematerialise the head in the backward pass from its convs' outputs (same numbers)
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class Auxiliary:
    """One entry of ``model.auxiliary``: an FCN head on a backbone level before the last."""

    in_channels: int
    out_channels: int
    dropout: float
    num_convs: int
    upsample_scale: int | None


def typed(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls`` (a dataclass above) from the mapping ``values`` at config path ``where``; nested
    dataclasses are built the same way, lists become tuples."""
    if not isinstance(values, Mapping) and not hasattr(values, "items"):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    values = dict(values.items())
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    fields = dataclasses.fields(cls)
    names = [field.name for field in fields]
    unknown = sorted(set(values) - set(names))
    optional = {field.name for field in fields if field.default is not dataclasses.MISSING}
    missing = [name for name in names if name not in values and name not in optional]
    if unknown or missing:
        parts = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + (
            [f"missing key(s) {', '.join(missing)}"] if missing else []
        )
        raise ConfigError(f"{where}: {'; '.join(parts)} (expected exactly: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        value, hint = values[name], hints[name]
        if dataclasses.is_dataclass(hint):
            value = typed(hint, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def head_of(values: Mapping[str, Any], where: str = "model.head") -> Head:
    """The typed head of ``config.model.head`` (``update``, the memory update's former name, is
    read as ``memory_update`` with a one-line note)."""
    values = dict(values.items())
    for old, new in RENAMED_HEAD_KEYS.items():
        if old in values and new not in values:
            print(f"note: {where}.{old} is now {where}.{new} (read as such)", file=sys.stderr)
            values[new] = values.pop(old)
    return typed(Head, values, where)


def auxiliaries_of(values: Any, where: str = "model.auxiliary") -> tuple[Auxiliary, ...]:
    return tuple(typed(Auxiliary, aux, f"{where}[{i}]") for i, aux in enumerate(values or ()))
