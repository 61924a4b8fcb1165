"""Predictions of a set without labels, written as the datasets' evaluation servers expect.

Each dataset stores its labels on disk as raw ids that ``DatasetSpec.label_map`` sends to class
indices; a submission sends the predicted classes back to those raw ids:

* Cityscapes: train ids -> label ids (road 7, ..., bicycle 33), one
  ``<city>_<seq>_<frame>_leftImg8bit.png`` per image (the official scripts match
  ``<city>_<seq>_<frame>*.png``), an 8-bit palette PNG as the reference writes it.
* ADE20K (SceneParsing server): class k -> k + 1 (0 = "other" never predicted),
  ``ADE_test_<n>.png``.
* COCO-Stuff-10k: class k -> COCO-Stuff id k + 1 (0 = unlabeled), ``<id>.png``.
* LIP: class indices 0..19 unchanged, ``<id>.png``.

The reference writes server files for Cityscapes only; the other datasets follow the same rule
(the inverse of the reading map).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mcibi_jax.data.datasets import SPECS, DatasetSpec
from mcibi_jax.evaluation.inference import WHOLE_IMAGE, check_inference_config, predict


def raw_id_table(spec: DatasetSpec) -> np.ndarray:
    """(num_classes,) uint8: class index -> the raw id that stands for it on disk."""
    table = np.full((spec.num_classes,), -1, np.int64)
    for raw, target in spec.label_map.items():
        if target is None or raw < 0:
            continue
        if table[target] != -1:
            raise ValueError(
                f"{spec.name}: class {target} has several raw ids ({table[target]}, {raw})"
            )
        table[target] = raw
    if (table < 0).any() or (table > 255).any():
        raise ValueError(
            f"{spec.name}: classes {np.flatnonzero((table < 0) | (table > 255)).tolist()} have no 8-bit raw id"
        )
    return table.astype(np.uint8)


def to_raw_ids(classes: Any, dataset: str) -> np.ndarray:
    """(H, W) class indices -> (H, W) uint8 raw ids of ``dataset`` (see the module doc)."""
    classes = np.asarray(classes)
    table = raw_id_table(SPECS[dataset])
    if classes.size and (classes.min() < 0 or classes.max() >= table.shape[0]):
        raise ValueError(f"class indices outside [0, {table.shape[0]}) for {dataset}")
    return table[classes]


def cityscapes_train_to_label_ids(train_ids: Any) -> np.ndarray:
    return to_raw_ids(train_ids, "cityscapes")


def file_name(sample_id: str, dataset: str) -> str:
    """The submission file of a sample: its id's last part + ``.png`` (Cityscapes' ids end in
    ``_leftImg8bit``, giving ``<city>_<seq>_<frame>_leftImg8bit.png``)."""
    name = Path(str(sample_id)).name
    if not name:
        raise ValueError(f"sample id {sample_id!r} has no file name")
    return f"{name}.png"


def _palette(spec: DatasetSpec) -> list[int]:
    """Colours by raw id (each class's colour at its raw id, black elsewhere)."""
    colours = np.zeros((256, 3), np.uint8)
    colours[raw_id_table(spec)] = np.asarray(spec.palette, np.uint8)
    return colours.reshape(-1).tolist()


def save_prediction(path: str | os.PathLike, classes: Any, dataset: str) -> Path:
    """Writes one (H, W) prediction of class indices as ``dataset``'s raw-id PNG."""

    raw = to_raw_ids(classes, dataset)
    image = Image.fromarray(raw, mode="L")
    if dataset == "cityscapes":  # the reference writes palette images; the values are the label ids
        image = image.convert("P")
        image.putpalette(_palette(SPECS[dataset]))
    path = Path(path)
    image.save(path)
    return path


def write_submission(
    model: Any,
    variables: Mapping[str, Any],
    items: Iterable[Mapping[str, Any]],
    dataset: str,
    directory: str | os.PathLike,
    *,
    align_corners: bool = False,
    inference: Mapping[str, Any] = WHOLE_IMAGE,
    flip_label_pairs: Sequence[Sequence[int]] = (),
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Predicts every valid item of an evaluation loader ({"image": (1, H', W', 3), "label":
    (1, H, W) (only its size is used), "valid", "id"}) at the original size and writes it to
    ``directory``; returns the files written."""
    if dataset not in SPECS:
        raise ValueError(f"no submission format for dataset {dataset!r}; known: {', '.join(SPECS)}")
    check_inference_config(inference)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for item in items:
        if not np.asarray(item.get("valid", True)).all():
            continue
        size = tuple(np.shape(item["label"])[1:3])
        classes = predict(
            model,
            variables,
            item["image"],
            inference,
            align_corners=align_corners,
            flip_label_pairs=flip_label_pairs,
            output_size=size,
        )
        ids = item["id"]
        ids = [ids] if isinstance(ids, str) else list(np.asarray(ids).reshape(-1))
        for sample_id, prediction in zip(ids, np.asarray(classes)):
            written.append(
                save_prediction(directory / file_name(str(sample_id), dataset), prediction, dataset)
            )
        if log is not None and len(written) % 100 == 0:
            log(f"wrote {len(written)} predictions")
    return written
