"""Readers of Cityscapes, ADE20K, COCO-Stuff-10k, LIP and your own ("custom") datasets.

``build_source(config.dataset, config.dataset.train_set)`` gives a random-access
:class:`Source` of ``{"image", "label", "id"}`` samples; docs/datasets.md describes the layouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import ade20k, cityscapes, cocostuff, custom, lip
from .core import (
    IGNORE_LABEL,
    CorruptSample,
    DatasetConfigError,
    DatasetError,
    DatasetLayoutError,
    DatasetSpec,
    Sample,
    Source,
    check_files,
)

SPECS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (cityscapes.SPEC, ade20k.SPEC, cocostuff.SPEC, lip.SPEC)
}
# Kinds whose spec depends on the root (``name: "custom"``: classes from <root>/dataset.json).
KINDS: tuple[str, ...] = (*SPECS, custom.NAME)

__all__ = [
    "IGNORE_LABEL",
    "SPECS",
    "CorruptSample",
    "DatasetConfigError",
    "DatasetError",
    "DatasetLayoutError",
    "DatasetSpec",
    "KINDS",
    "Sample",
    "Source",
    "build_source",
]


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def build_source(
    dataset_config: Any, split: str, *, with_labels: bool = True, check: bool = True
) -> Source:
    """The samples of one set of a dataset.

    Args:
      dataset_config: ``config.dataset`` (a ConfigDict or mapping) with ``name`` (one of
        ``SPECS``, or "custom"), ``root``, and optionally ``num_classes`` (checked) and ``ignore_label``
        (default -100).
      split: the set's name: "train", "val", "test" or "trainval" (Cityscapes); "train",
        "val", "test" (ADE20K, LIP); "train", "test", "all" (COCO-Stuff-10k). Pass
        ``dataset_config.train_set`` / ``eval_set`` to get the recipe's sets.
      with_labels: False for sets without published labels (e.g. LIP or ADE20K test): labels
        are not read and each sample's label is all ``ignore_label``.
      check: verify now that every image and label file exists (one listing per folder).

    Raises:
      DatasetConfigError: unknown name or split, or a ``num_classes`` that does not match.
      DatasetLayoutError: a missing root, folder, list file, image or label file.
    """
    name = _get(dataset_config, "name")
    if name == custom.NAME:
        spec = custom.load_spec(_get(dataset_config, "root") or "")
    elif name not in SPECS:
        raise DatasetConfigError(f"unknown dataset {name!r}; known: {', '.join(KINDS)}")
    else:
        spec = SPECS[name]
    if split not in spec.splits:
        raise DatasetConfigError(
            f"{name} has no split {split!r}; choose one of {', '.join(spec.splits)}"
        )
    num_classes = _get(dataset_config, "num_classes")
    if num_classes is not None and int(num_classes) != spec.num_classes:
        raise DatasetConfigError(
            f"config says num_classes={num_classes} but {name} has {spec.num_classes} classes"
        )
    root_value = _get(dataset_config, "root")
    if not root_value:
        raise DatasetConfigError(f"dataset config for {name} has no 'root'")
    root = Path(root_value).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(
            f"dataset root {root} does not exist or is not a folder; expected layout: {spec.layout}"
        )
    samples = spec.find_samples(root, split, with_labels)
    if not samples:
        raise DatasetLayoutError(
            f"{name} split {split!r} under {root} has no samples; expected layout: {spec.layout}"
        )
    if check:
        check_files(samples, spec.layout)
    return Source(
        spec, split, samples, ignore_label=_get(dataset_config, "ignore_label", IGNORE_LABEL)
    )
