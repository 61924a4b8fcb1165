"""The 18 released MCIBI recipes, as ``configs/<dataset>.py`` write them.

``released_config(dataset, backbone)`` is ``get_config(backbone)`` of ``configs/<dataset>.py``
(the package reads that folder as ``mcibi_jax.configs``). Its ``model`` is exactly what
:func:`mcibi_jax.reference_config.model_config_from_reference` gives for the authors' released
config, so the released checkpoints port onto it strictly.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import ml_collections

DATASETS = ("cityscapes", "ade20k", "cocostuff10k", "lip")


def _config_module(dataset: str) -> ModuleType:
    return importlib.import_module(f"mcibi_jax.configs.{dataset}")


BACKBONES: tuple[str, ...] = tuple(importlib.import_module("mcibi_jax.configs.common").BACKBONES)
RELEASED: list[tuple[str, str]] = [(d, b) for d in DATASETS for b in _config_module(d).BACKBONES]
# Single-scale / multi-scale(+flip) mIoU (%) published with the checkpoints (None: not published).
PUBLISHED_MIOU: dict[tuple[str, str], tuple[float | None, float]] = {
    (d, b): _config_module(d).PUBLISHED_MIOU[b] for d, b in RELEASED
}
# Released checkpoint layouts: ``tests/reference/keys/<name>.txt``.
_KEYS_PREFIX = {
    "r50": "resnet50os8",
    "r101": "resnet101os8",
    "s101": "resnest101os8",
    "hrnet48": "hrnetv2w48",
    "vitl": "vitlarge",
}
KEYS_FILES: dict[tuple[str, str], str] = {(d, b): f"{_KEYS_PREFIX[b]}_{d}" for d, b in RELEASED}


def config_file(dataset: str) -> Path:
    """The recipe file ``configs/<dataset>.py`` (as the package sees it, ``mcibi_jax/configs``)."""
    return Path(_config_module(dataset).__file__)


def released_config(dataset: str, backbone: str) -> ml_collections.ConfigDict:
    """Experiment config of a released MCIBI recipe, e.g. ``released_config("cityscapes", "r50")``.

    Top-level keys: ``model`` (see :mod:`mcibi_jax.reference_config`), ``dataset``, ``train``,
    ``eval``, ``dtype``; locked, as :func:`mcibi_jax.config.load_config` locks it. ValueError
    (naming the choices) for a combination never released.
    """
    if dataset not in DATASETS:
        raise ValueError(
            f"no released MCIBI recipe for dataset {dataset!r} with backbone "
            f"{backbone!r}; datasets: {', '.join(DATASETS)}"
        )
    config = _config_module(dataset).get_config(backbone)
    config.lock()
    return config


__all__ = [
    "BACKBONES",
    "DATASETS",
    "KEYS_FILES",
    "PUBLISHED_MIOU",
    "RELEASED",
    "config_file",
    "released_config",
]
