"""What a dataset's classes are called and how they are drawn: names, colours, the background.

One lookup by ``config.dataset.name`` for every dataset: the released ones (their specs), the
generated demo scenes, and a custom dataset (its ``<root>/dataset.json``). Classes a dataset does
not describe are ``class <k>`` with a generated colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mcibi_jax.data import synthetic
from mcibi_jax.data.datasets import SPECS, DatasetError
from mcibi_jax.data.datasets.custom import NAME as CUSTOM
from mcibi_jax.data.datasets.custom import read_description

# Class names that stand for "nothing in particular" (left unpainted in overlays).
BACKGROUND_NAMES = ("background", "__background__", "_background_")


def generated_palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 distinct colours, the same for every run: the bits of each class id are
    spread over the three channels from the most significant bit down (class 0 is black)."""
    ids = np.arange(num_classes, dtype=np.int64)
    colours = np.zeros((num_classes, 3), np.int64)
    for level in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * level + channel)) & 1) << (7 - level)
    return colours.astype(np.uint8)


def _described(
    dataset_config: Mapping[str, Any] | None, num_classes: int
) -> tuple[Sequence[str], Sequence[Any]]:
    """(class names, palette) the dataset itself gives; empty where it gives none."""
    name = (dataset_config or {}).get("name", "")
    if name == CUSTOM:
        try:
            description = read_description(dataset_config["root"])
        except DatasetError:
            return (), ()
        return description["classes"], description["palette"]
    if name == synthetic.NAME:
        return synthetic.class_names(num_classes), ()
    spec = SPECS.get(name)
    return (spec.class_names, spec.palette) if spec is not None else ((), ())


def class_names(dataset_config: Mapping[str, Any] | None, num_classes: int) -> list[str]:
    """The ``num_classes`` class names of ``config.dataset``; ``class <k>`` where none is known."""
    names = [str(n) for n in _described(dataset_config, num_classes)[0]][:num_classes]
    return names + [f"class {k}" for k in range(len(names), num_classes)]


def dataset_palette(dataset_config: Mapping[str, Any] | None, num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: the dataset's own palette where it has one, else (the demo, unknown
    datasets, classes beyond the palette) :func:`generated_palette`."""
    colours = generated_palette(num_classes)
    own = np.asarray(_described(dataset_config, num_classes)[1], np.uint8).reshape(-1, 3)[
        :num_classes
    ]
    colours[: len(own)] = own
    return colours


def background_class(dataset_config: Mapping[str, Any] | None, num_classes: int) -> int | None:
    """The class that stands for "nothing in particular", left unpainted in overlays, or None.

    A class named ``background`` (LIP's class 0 ``__background__``, the demo's class 0, a custom
    dataset's class of that name). Cityscapes, ADE20K and COCO-Stuff have none: all their
    classes are things or stuff, and their unlabelled pixels are ignored, not a class.
    """
    for index, name in enumerate(class_names(dataset_config, num_classes)):
        if name.lower() in BACKGROUND_NAMES:
            return index
    return None


__all__ = [
    "BACKGROUND_NAMES",
    "background_class",
    "class_names",
    "dataset_palette",
    "generated_palette",
]
