"""Cityscapes (gtFine): 19 evaluation classes read from the ``*_gtFine_labelIds.png`` files."""

from __future__ import annotations

from pathlib import Path

from .core import DatasetLayoutError, DatasetSpec, Sample, read_id_list, read_png_label, require_dir

# (label id, name, train id or None = ignored) of every Cityscapes label, as defined by the
# official cityscapesScripts. License plate (-1) never occurs in labelIds images.
LABELS: tuple[tuple[int, str, int | None], ...] = (
    (0, "unlabeled", None),
    (1, "ego vehicle", None),
    (2, "rectification border", None),
    (3, "out of roi", None),
    (4, "static", None),
    (5, "dynamic", None),
    (6, "ground", None),
    (7, "road", 0),
    (8, "sidewalk", 1),
    (9, "parking", None),
    (10, "rail track", None),
    (11, "building", 2),
    (12, "wall", 3),
    (13, "fence", 4),
    (14, "guard rail", None),
    (15, "bridge", None),
    (16, "tunnel", None),
    (17, "pole", 5),
    (18, "polegroup", None),
    (19, "traffic light", 6),
    (20, "traffic sign", 7),
    (21, "vegetation", 8),
    (22, "terrain", 9),
    (23, "sky", 10),
    (24, "person", 11),
    (25, "rider", 12),
    (26, "car", 13),
    (27, "truck", 14),
    (28, "bus", 15),
    (29, "caravan", None),
    (30, "trailer", None),
    (31, "train", 16),
    (32, "motorcycle", 17),
    (33, "bicycle", 18),
    (-1, "license plate", None),
)

CLASS_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic_light",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

LABEL_MAP = {label_id: train_id for label_id, _, train_id in LABELS}

SPLITS = ("train", "val", "test", "trainval")

LAYOUT = (
    "<root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
    "<root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png for split in "
    "train/val/test (trainval = train + val); optionally <root>/<set>.txt listing ids "
    "relative to leftImg8bit/<set> (then leftImg8bit/<set> and gtFine/<set> must exist)"
)

_IMAGE_SUFFIX = "_leftImg8bit.png"


def _label_path(root: Path, folder: str, sample_id: str) -> str:
    return str(
        root / "gtFine" / folder / f"{sample_id.replace('leftImg8bit', 'gtFine_labelIds')}.png"
    )


def _listed(root: Path, split: str, with_labels: bool) -> list[Sample]:
    ids = read_id_list(root / f"{split}.txt", LAYOUT)
    images = require_dir(
        root / "leftImg8bit" / split, f"image folder of list file {root / f'{split}.txt'}", LAYOUT
    )
    if with_labels:
        require_dir(
            root / "gtFine" / split, f"label folder of list file {root / f'{split}.txt'}", LAYOUT
        )
    return [
        Sample(i, str(images / f"{i}.png"), _label_path(root, split, i) if with_labels else None)
        for i in ids
    ]


def _scanned(root: Path, split: str, with_labels: bool) -> list[Sample]:
    images = require_dir(root / "leftImg8bit" / split, "image folder", LAYOUT)
    if with_labels:
        require_dir(root / "gtFine" / split, "label folder", LAYOUT)
    files = sorted(images.glob(f"*/*{_IMAGE_SUFFIX}"))
    if not files:
        raise DatasetLayoutError(
            f"no *{_IMAGE_SUFFIX} images in the city folders of {images}; expected layout: {LAYOUT}"
        )
    samples = []
    for file in files:
        sample_id = file.relative_to(images).as_posix()[: -len(".png")]
        samples.append(
            Sample(
                sample_id, str(file), _label_path(root, split, sample_id) if with_labels else None
            )
        )
    return samples


def find_samples(root: Path, split: str, with_labels: bool) -> list[Sample]:
    """The samples of ``split``: from ``<root>/<split>.txt`` if present, else the official folders."""
    if (root / f"{split}.txt").is_file():
        return _listed(root, split, with_labels)
    if split == "trainval":
        return _scanned(root, "train", with_labels) + _scanned(root, "val", with_labels)
    return _scanned(root, split, with_labels)


SPEC = DatasetSpec(
    name="cityscapes",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    label_map=LABEL_MAP,
    splits=SPLITS,
    layout=LAYOUT,
    find_samples=find_samples,
    read_label=read_png_label,
)
