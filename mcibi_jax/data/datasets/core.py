"""What every dataset reader shares: errors, decoding, label mapping and the ``Source`` type."""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

IGNORE_LABEL = -100  # what the losses and metrics of this project skip
_INVALID = np.iinfo(np.int32).min  # marks raw ids that have no entry in a mapping


class DatasetError(Exception):
    """Base class of the dataset readers' errors."""


class DatasetLayoutError(DatasetError, FileNotFoundError):
    """The dataset root, a split's folder or list file, or a sample's file is missing."""


class DatasetConfigError(DatasetError, ValueError):
    """The dataset config asks for something the reader does not know (name, split, classes)."""


class CorruptSample(DatasetError):
    """One sample cannot be used: unreadable file, unknown label id, image/label size mismatch.

    A pipeline may catch this, count it and skip the sample; ``path``, ``sample_id`` and
    ``reason`` say which file and what is wrong.
    """

    def __init__(self, path: str | os.PathLike, reason: str, sample_id: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.sample_id = sample_id
        where = f" (sample {sample_id!r})" if sample_id is not None else ""
        super().__init__(f"{self.path}: {reason}{where}")

    def __reduce__(self):  # keeps the fields when sent between worker processes
        return (type(self), (self.path, self.reason, self.sample_id))


@dataclasses.dataclass(frozen=True)
class Sample:
    """Where one sample lives: its id, its image and (None when unlabelled) its label file."""

    id: str
    image: str
    label: str | None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Everything fixed about one dataset.

    ``label_map`` sends each raw id stored on disk to a class index, or to None for "ignore";
    raw ids that are not keys are invalid. ``find_samples(root, split, with_labels)`` lists a
    split; ``read_label(path, sample_id)`` returns the raw ids as an integer (H, W) array.
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    label_map: Mapping[int, int | None]
    splits: tuple[str, ...]
    layout: str  # one line saying what a root must hold, for error messages
    find_samples: Callable[[Path, str, bool], list[Sample]]
    read_label: Callable[[str, str | None], np.ndarray]
    flip_label_pairs: tuple[tuple[int, int], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------------------
# Files


def read_id_list(path: Path, layout: str) -> list[str]:
    """Non-empty stripped lines of a list file (one sample id per line)."""
    if not path.is_file():
        raise DatasetLayoutError(f"list file {path} does not exist; expected layout: {layout}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetLayoutError(f"list file {path} cannot be read: {error}") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(
            f"{what} {path} does not exist or is not a folder; expected layout: {layout}"
        )
    return path


def check_files(samples: Sequence[Sample], layout: str) -> None:
    """Raises DatasetLayoutError naming the first missing image or label file (and how many)."""
    listings: dict[str, set[str]] = {}

    def exists(file: str) -> bool:
        folder, name = os.path.split(file)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except OSError:
                listings[folder] = set()
        return name in listings[folder]

    for kind in ("image", "label"):
        missing = [
            s for s in samples if getattr(s, kind) is not None and not exists(getattr(s, kind))
        ]
        if missing:
            first = missing[0]
            what = "image" if kind == "image" else f"label of image {first.image}"
            raise DatasetLayoutError(
                f"{len(missing)} of {len(samples)} samples have no {kind} file; first: {what} "
                f"should be {getattr(first, kind)} (sample {first.id!r}); expected layout: {layout}"
            )


def decode_with_pil(
    path: Any,
    sample_id: str | None,
    *,
    modes: tuple[str, ...],
    bad_mode: str,
    what: str,
    cannot: str,
    convert: str | None = None,
) -> np.ndarray:
    """Decodes ``path`` with PIL to a uint8 array; every failure is a :class:`CorruptSample`:
    a mode outside ``modes`` (``bad_mode`` formatted with ``mode``), a missing file ("``what``
    file is missing") or anything PIL raises ("``cannot``: error"). ``convert``: the mode to
    convert to first."""

    try:
        with Image.open(path) as image:
            if image.mode not in modes:
                raise CorruptSample(path, bad_mode.format(mode=repr(image.mode)), sample_id)
            if convert is not None and image.mode != convert:
                image = image.convert(convert)
            return np.array(image, dtype=np.uint8)  # 'P': the palette indices, not the colours
    except CorruptSample:
        raise
    except FileNotFoundError:
        raise CorruptSample(path, f"{what} file is missing", sample_id) from None
    except Exception as error:  # PIL raises many types for damaged files
        raise CorruptSample(path, f"{cannot}: {error}", sample_id) from error


def read_image(path: str, sample_id: str | None = None) -> np.ndarray:
    """Decodes an image file to (H, W, 3) uint8 RGB (grey, palette and RGBA images converted)."""
    return decode_with_pil(
        path,
        sample_id,
        modes=("RGB", "L", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr"),
        bad_mode="unsupported image mode {mode} (expected 8-bit RGB or grey)",
        what="image",
        cannot="cannot decode image",
        convert="RGB",
    )


def read_png_label(path: str, sample_id: str | None = None) -> np.ndarray:
    """Raw ids of a single-channel 8-bit label PNG, as a (H, W) uint8 array."""
    return decode_with_pil(
        path,
        sample_id,
        modes=("L",),
        what="label",
        cannot="cannot decode label image",
        bad_mode="label image has mode {mode}; expected a single-channel 8-bit ('L') PNG of label ids",
    )


# ------------------------------------------------------------------------------------------
# Label mapping


def lookup_table(label_map: Mapping[int, int | None], ignore_label: int) -> np.ndarray:
    """(max_id + 1,) int32: raw id -> class index, ``ignore_label``, or _INVALID."""
    size = max(k for k in label_map if k >= 0) + 1
    table = np.full((size,), _INVALID, dtype=np.int32)
    for raw, target in label_map.items():
        if raw >= 0:  # negative ids (Cityscapes' license plate, -1) cannot be stored in a PNG
            table[raw] = ignore_label if target is None else target
    return table


def map_label(
    raw: np.ndarray, table: np.ndarray, path: str, sample_id: str | None, dataset: str
) -> np.ndarray:
    """Applies a lookup table to raw ids; any id without an entry raises CorruptSample."""
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise CorruptSample(path, "label map holds non-integer values", sample_id)
    elif raw.dtype.kind not in "iub":
        raise CorruptSample(path, f"label map has dtype {raw.dtype}; expected integers", sample_id)
    if raw.dtype in (np.uint8, np.uint16):  # fast path: a table over the dtype's whole range
        full = np.full((1 << (8 * raw.dtype.itemsize),), _INVALID, dtype=np.int32)
        size = min(table.shape[0], full.shape[0])
        full[:size] = table[:size]
        ids = raw
        if raw.dtype == np.uint8 and raw.ndim == 2 and raw.size:
            # OpenCV's table lookup and histogram: a tenth of numpy's indexing time
            raw = np.ascontiguousarray(raw)
            present = cv2.calcHist([raw], [0], None, [256], [0, 256]).ravel() > 0
            if not (present & (full == _INVALID)).any():
                return cv2.LUT(raw, full.reshape(1, 256))
        mapped = full[raw]
        bad = mapped == _INVALID
    else:
        ids = raw.astype(np.int64, copy=False)
        out_of_table = (ids < 0) | (ids >= table.shape[0])
        mapped = table[np.where(out_of_table, 0, ids)]
        bad = out_of_table | (mapped == _INVALID)
    if bad.any():
        unknown = np.unique(ids[bad])
        shown = ", ".join(str(v) for v in unknown[:10]) + (", ..." if unknown.size > 10 else "")
        valid = np.flatnonzero(table != _INVALID)
        raise CorruptSample(
            path,
            f"label ids {{{shown}}} are not in the {dataset} mapping "
            f"(valid raw ids: {_ranges(valid)})",
            sample_id,
        )
    return mapped.astype(np.int32, copy=False)


def _ranges(values: np.ndarray) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# Source


class DescribedBySpec:
    """Name, classes, palette and flip pairs of a sample source, from its ``spec``."""

    spec: DatasetSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def palette(self) -> np.ndarray:
        """(num_classes, 3) uint8 RGB colour of each class (read-only)."""
        palette = np.asarray(self.spec.palette, dtype=np.uint8).reshape(-1, 3)
        palette.flags.writeable = False
        return palette

    @property
    def flip_label_pairs(self) -> tuple[tuple[int, int], ...]:
        """Class pairs that swap when the image is mirrored (LIP's left/right parts), else ()."""
        return self.spec.flip_label_pairs


class Source(DescribedBySpec):
    """Random-access samples of one split, as a grain ``RandomAccessDataSource`` expects.

    ``source[i]`` is ``{"image": (H, W, 3) uint8 RGB, "label": (H, W) int32, "id": str}``;
    labels hold class indices in ``[0, num_classes)`` or ``ignore_label``. Without labels
    (``with_labels=False``) the label is all ``ignore_label``. Problems with one sample raise
    :class:`CorruptSample`.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        split: str,
        samples: Sequence[Sample],
        ignore_label: int = IGNORE_LABEL,
    ):
        self.spec = spec
        self.split = split
        self.ignore_label = int(ignore_label)
        self.samples: tuple[Sample, ...] = tuple(samples)
        self._table = lookup_table(spec.label_map, self.ignore_label)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(
                f"index {index} out of range for {len(self.samples)} samples of {self.name}/{self.split}"
            )
        sample = self.samples[index]
        image = read_image(sample.image, sample.id)
        if sample.label is None:
            label = np.full(image.shape[:2], self.ignore_label, dtype=np.int32)
        else:
            raw = self.spec.read_label(sample.label, sample.id)
            if raw.ndim != 2 or raw.shape != image.shape[:2]:
                raise CorruptSample(
                    sample.label,
                    f"label has shape {raw.shape} but image {sample.image} "
                    f"is {image.shape[0]}x{image.shape[1]}",
                    sample.id,
                )
            label = map_label(raw, self._table, sample.label, sample.id, self.name)
        return {"image": image, "label": label, "id": sample.id}

    def __repr__(self) -> str:
        return f"Source({self.name!r}, split={self.split!r}, {len(self)} samples)"
