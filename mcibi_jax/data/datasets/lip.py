"""LIP (Look Into Person): 20 human-part classes, background included; no ignored id."""

from __future__ import annotations

from pathlib import Path

from .core import DatasetSpec, Sample, read_id_list, read_png_label, require_dir

CLASS_NAMES = (
    "__background__",
    "hat",
    "hair",
    "glove",
    "sunglasses",
    "upperclothes",
    "dress",
    "coat",
    "socks",
    "pants",
    "jumpsuits",
    "scarf",
    "skirt",
    "face",
    "leftArm",
    "rightArm",
    "leftLeg",
    "rightLeg",
    "leftShoe",
    "rightShoe",
)

PALETTE = (
    (0, 0, 0),
    (128, 0, 0),
    (255, 0, 0),
    (0, 85, 0),
    (170, 0, 51),
    (255, 85, 0),
    (0, 0, 85),
    (0, 119, 221),
    (85, 85, 0),
    (0, 85, 85),
    (85, 51, 0),
    (52, 86, 128),
    (0, 128, 0),
    (0, 0, 255),
    (51, 170, 221),
    (0, 255, 255),
    (85, 255, 170),
    (170, 255, 85),
    (255, 255, 0),
    (255, 170, 0),
)

LABEL_MAP: dict[int, int | None] = {k: k for k in range(20)}

# rightArm/leftArm, rightLeg/leftLeg, rightShoe/leftShoe swap under a horizontal flip.
FLIP_LABEL_PAIRS = ((15, 14), (17, 16), (19, 18))

SPLITS = ("train", "val", "test")
_PREFIX = {"train": "train", "val": "val", "test": "testing"}

LAYOUT = (
    "<root>/{train,val}_images/<id>.jpg, <root>/{train,val}_segmentations/<id>.png and "
    "<root>/{train,val}_id.txt (test: <root>/testing_images/<id>.jpg and <root>/test_id.txt)"
)


def find_samples(root: Path, split: str, with_labels: bool) -> list[Sample]:
    """The samples listed in ``<root>/<split>_id.txt``."""
    prefix = _PREFIX[split]
    ids = read_id_list(root / f"{split}_id.txt", LAYOUT)
    images = require_dir(root / f"{prefix}_images", "image folder", LAYOUT)
    labels = (
        require_dir(root / f"{prefix}_segmentations", "label folder", LAYOUT)
        if with_labels
        else None
    )
    return [
        Sample(i, str(images / f"{i}.jpg"), str(labels / f"{i}.png") if labels else None)
        for i in ids
    ]


SPEC = DatasetSpec(
    name="lip",
    class_names=CLASS_NAMES,
    palette=PALETTE,
    label_map=LABEL_MAP,
    splits=SPLITS,
    layout=LAYOUT,
    find_samples=find_samples,
    read_label=read_png_label,
    flip_label_pairs=FLIP_LABEL_PAIRS,
)
