"""Your own dataset: images, index-PNG masks, split lists and a ``dataset.json`` description.

Layout (docs/custom_datasets.md)::

    <root>/dataset.json            {"classes": [...], "ignore_index": 255, "palette": ..., "flip_pairs": ...}
    <root>/images/<name>.jpg|.jpeg|.png
    <root>/masks/<name>.png        single-channel PNG ('L' or 'P'): value k = class k, ignore_index = ignore
    <root>/splits/<split>.txt      one <name> per line

Unlike the released datasets, the classes come from the root, so :func:`load_spec` builds the
:class:`DatasetSpec` of one root (``build_source`` does this for ``name: "custom"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import config_dict

from .core import (
    DatasetConfigError,
    DatasetLayoutError,
    DatasetSpec,
    Sample,
    decode_with_pil,
    read_id_list,
    require_dir,
)

NAME = "custom"
DESCRIPTION = "dataset.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = (
    "<root>/dataset.json (classes, ignore_index), <root>/images/<name>.{jpg,jpeg,png}, "
    "<root>/masks/<name>.png (single-channel class ids) and <root>/splits/<split>.txt (one name per line)"
)


class DatasetDescriptionError(DatasetLayoutError):
    """``<root>/dataset.json`` is missing, is not valid JSON or has invalid fields."""


def generated_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours from the bits of each class id (the PASCAL VOC colour-map scheme)."""
    ids = np.arange(num_classes)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for level in range(8):
        for channel in range(3):
            colours[:, channel] |= ((ids >> (3 * level + channel)) & 1) << (7 - level)
    return tuple(tuple(int(c) for c in row) for row in colours)


def _fail(path: Path, message: str) -> DatasetDescriptionError:
    return DatasetDescriptionError(f"{path}: {message}; see docs/custom_datasets.md")


def read_description(root: str | os.PathLike) -> dict[str, Any]:
    """The checked contents of ``<root>/dataset.json``.

    Returns ``{"classes": tuple[str], "ignore_index": int, "palette": tuple[(r, g, b)],
    "flip_pairs": tuple[(a, b)], "name": str}`` (palette generated when absent).

    Raises:
      DatasetDescriptionError: missing or unreadable file, or invalid fields.
    """
    path = Path(root).expanduser() / DESCRIPTION
    if not path.is_file():
        raise DatasetDescriptionError(
            f"{path} does not exist: a custom dataset root needs a dataset.json listing its classes "
            f"(set --config.dataset.root=<your dataset folder>); expected layout: {LAYOUT}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(path, f"cannot be read as JSON: {error}") from None
    if not isinstance(data, dict):
        raise _fail(path, "must hold a JSON object")
    known = {"name", "classes", "ignore_index", "palette", "flip_pairs"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _fail(
            path, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )

    classes = data.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
    ):
        raise _fail(
            path, "'classes' must be a non-empty list of class names (index k = mask value k)"
        )
    if len(set(classes)) != len(classes):
        raise _fail(path, "'classes' has duplicate names")
    if len(classes) > 255:
        raise _fail(
            path,
            f"{len(classes)} classes do not fit 8-bit masks (at most 255 besides the ignore value)",
        )
    num_classes = len(classes)

    ignore = data.get("ignore_index", 255)
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 255:
        raise _fail(
            path,
            f"'ignore_index' must be an integer in 0..255 (the mask value of unlabelled pixels), got {ignore!r}",
        )
    if ignore < num_classes:
        raise _fail(
            path,
            f"'ignore_index' {ignore} is a class id (0..{num_classes - 1}); use a value >= {num_classes}, "
            "e.g. 255",
        )

    palette = data.get("palette")
    if palette is None:
        palette = generated_palette(num_classes)
    else:
        ok = (
            isinstance(palette, list)
            and len(palette) == num_classes
            and all(
                isinstance(c, list)
                and len(c) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in palette
            )
        )
        if not ok:
            raise _fail(
                path,
                f"'palette' must be a list of {num_classes} [r, g, b] lists of integers 0..255 "
                "(one per class), or left out",
            )
        palette = tuple(tuple(c) for c in palette)

    pairs = data.get("flip_pairs", [])
    ok = isinstance(pairs, list) and all(
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(v, int) and 0 <= v < num_classes for v in p)
        and p[0] != p[1]
        for p in pairs
    )
    if not ok:
        raise _fail(
            path,
            f"'flip_pairs' must be a list of [a, b] pairs of distinct class ids in 0..{num_classes - 1} "
            "(classes that swap when the image is mirrored, e.g. left/right arm)",
        )
    flat = [v for p in pairs for v in p]
    if len(set(flat)) != len(flat):
        raise _fail(path, "a class appears in more than one of 'flip_pairs'")

    name = data.get("name", Path(root).expanduser().resolve().name)
    if not isinstance(name, str):
        raise _fail(path, "'name' must be a string")
    return {
        "name": name,
        "classes": tuple(classes),
        "ignore_index": ignore,
        "palette": palette,
        "flip_pairs": tuple(tuple(p) for p in pairs),
    }


def num_classes_of(root: str | os.PathLike) -> int:
    """Number of classes listed in ``<root>/dataset.json`` (raises DatasetDescriptionError)."""
    return len(read_description(root)["classes"])


def flip_pairs_of(root: str | os.PathLike) -> tuple[tuple[int, int], ...]:
    """``flip_pairs`` of ``<root>/dataset.json`` (raises DatasetDescriptionError)."""
    return read_description(root)["flip_pairs"]


def splits_of(root: Path) -> tuple[str, ...]:
    """Names of the split lists ``<root>/splits/*.txt``, sorted."""
    folder = require_dir(root / "splits", "split list folder", LAYOUT)
    return tuple(sorted(p.stem for p in folder.glob("*.txt")))


class _Listing:
    """File names per folder, listed once (datasets may hold many thousands of files)."""

    def __init__(self):
        self._names: dict[str, dict[str, str]] = {}

    def find(self, folder: Path, name: str, suffixes: Sequence[str]) -> str | None:
        """Path of ``folder/name<suffix>`` for the first suffix that exists (case-insensitive)."""
        directory, stem = os.path.split(str(folder / name))
        if directory not in self._names:
            try:
                self._names[directory] = {n.lower(): n for n in os.listdir(directory)}
            except OSError:
                self._names[directory] = {}
        for suffix in suffixes:
            found = self._names[directory].get((stem + suffix).lower())
            if found is not None:
                return os.path.join(directory, found)
        return None


def find_samples(root: Path, split: str, with_labels: bool) -> list[Sample]:
    """The names of ``splits/<split>.txt`` with their image and mask paths.

    A missing image is given as ``images/<name>.jpg`` and a missing mask as ``masks/<name>.png``,
    so that ``check_files`` names them.
    """
    images = require_dir(root / "images", "image folder", LAYOUT)
    masks = require_dir(root / "masks", "mask folder", LAYOUT) if with_labels else None
    names = read_id_list(root / "splits" / f"{split}.txt", LAYOUT)
    listing = _Listing()
    samples = []
    for name in names:
        if name.startswith("/") or ".." in Path(name).parts:
            raise DatasetLayoutError(
                f"{root / 'splits' / f'{split}.txt'}: name {name!r} must be relative to images/"
            )
        for suffix in IMAGE_SUFFIXES:  # names written with their extension
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        image = listing.find(images, name, IMAGE_SUFFIXES) or str(images / f"{name}.jpg")
        mask = None
        if masks is not None:
            mask = listing.find(masks, name, (".png",)) or str(masks / f"{name}.png")
        samples.append(Sample(name, image, mask))
    return samples


def read_mask(path: str, sample_id: str | None = None) -> np.ndarray:
    """Class ids of a single-channel mask PNG ('L', or 'P' whose indices are the ids), (H, W) uint8."""
    return decode_with_pil(
        path,
        sample_id,
        modes=("L", "P"),
        what="mask",
        cannot="cannot decode mask",
        bad_mode="mask has mode {mode}; expected a single-channel 8-bit PNG "
        "('L' or palette 'P') whose values are class ids",
    )


def load_spec(root: str | os.PathLike) -> DatasetSpec:
    """The :class:`DatasetSpec` of the custom dataset at ``root`` (reads ``dataset.json``).

    Raises:
      DatasetLayoutError: missing root or ``splits`` folder.
      DatasetDescriptionError: missing or invalid ``dataset.json``.
      DatasetConfigError: no root given.
    """
    if not str(root):
        raise DatasetConfigError(
            "dataset config for custom has no 'root' (the folder holding dataset.json)"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(
            f"dataset root {root} does not exist or is not a folder; expected layout: {LAYOUT}"
        )
    description = read_description(root)
    num_classes = len(description["classes"])
    label_map: dict[int, int | None] = {k: k for k in range(num_classes)}
    label_map[description["ignore_index"]] = None
    return DatasetSpec(
        name=NAME,
        class_names=description["classes"],
        palette=description["palette"],
        label_map=label_map,
        splits=splits_of(root),
        layout=LAYOUT,
        find_samples=find_samples,
        read_label=read_mask,
        flip_label_pairs=description["flip_pairs"],
    )


# ------------------------------------------------------------------------------------------
# Config values that follow ``config.dataset.root`` (see configs/custom_template.py)


class FromRoot(config_dict.FieldReference):
    """A config value computed from the current root (``compute(root)``) until it is set explicitly.

    It reports itself ``empty()`` while unset, so that putting it into a ConfigDict does not
    read dataset.json yet. While the root is still the config file's own (``initial``) and has
    no dataset.json, it reads as ``placeholder``: ml_collections evaluates every field when it
    locks a config, before command-line overrides set the real root.
    """

    def __init__(
        self,
        root: config_dict.FieldReference,
        compute: Callable[[str], Any],
        field_type: type,
        placeholder: Any,
    ):
        self._root, self._compute, self._fixed = root, compute, False
        self._initial, self._placeholder = root.get(), placeholder
        super().__init__(None, field_type=field_type)

    def set(self, value: Any, type_safe: bool = True) -> None:
        self._fixed = value is not None
        super().set(value, type_safe)

    def get(self) -> Any:
        if self._fixed:
            return super().get()
        root = self._root.get()
        if root == self._initial and not (Path(root).expanduser() / DESCRIPTION).exists():
            return self._placeholder
        return self._compute(root)

    def __setstate__(
        self, state: dict[str, Any]
    ) -> None:  # the base class restores only its own fields
        self.__dict__.update(state)


def root_fields(root: str) -> dict[str, Any]:
    """ml_collections references for a config: ``root`` and values read lazily from its dataset.json.

    Returns ``{"root", "num_classes", "flip_label_pairs"}``; the last two are computed from the
    *current* root whenever they are read, so a ``--config.dataset.root=...`` applied after
    ``get_config`` still decides them. Reading them without a dataset.json at the root raises
    :class:`DatasetDescriptionError`, except at the initial ``root`` itself, where they read as
    0 and () (``build_source`` then reports the missing dataset.json). Setting one (``--config.dataset.num_classes=5``) replaces
    its lazy value with a fixed one. Assign the same reference to several fields to share it.
    """
    root_ref = config_dict.FieldReference(root, field_type=str)
    return {
        "root": root_ref,
        "num_classes": FromRoot(root_ref, num_classes_of, int, 0),
        "flip_label_pairs": FromRoot(root_ref, flip_pairs_of, tuple, ()),
    }
