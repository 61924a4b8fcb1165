"""COCO-Stuff-10k v1.1: ``.mat`` label maps with ids 0 (unlabeled) and 1..182 (COCO ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .core import CorruptSample, DatasetSpec, Sample, read_id_list, require_dir

# COCO-Stuff's 182 ids in order (1..91 things, 92..182 stuff). 11 thing ids (street sign,
# hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair brush) are never
# annotated, but they keep their class index, as in the reference (182 output classes).
CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "hair brush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)

# The PASCAL VOC colour map (bits of the class index spread over R, G, B) for 182 classes.
PALETTE = (
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128),
    (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0),
    (128, 192, 0), (0, 64, 128), (128, 64, 128), (0, 192, 128), (128, 192, 128), (64, 64, 0),
    (192, 64, 0), (64, 192, 0), (192, 192, 0), (64, 64, 128), (192, 64, 128), (64, 192, 128),
    (192, 192, 128), (0, 0, 64), (128, 0, 64), (0, 128, 64), (128, 128, 64), (0, 0, 192),
    (128, 0, 192), (0, 128, 192), (128, 128, 192), (64, 0, 64), (192, 0, 64), (64, 128, 64),
    (192, 128, 64), (64, 0, 192), (192, 0, 192), (64, 128, 192), (192, 128, 192), (0, 64, 64),
    (128, 64, 64), (0, 192, 64), (128, 192, 64), (0, 64, 192), (128, 64, 192), (0, 192, 192),
    (128, 192, 192), (64, 64, 64), (192, 64, 64), (64, 192, 64), (192, 192, 64), (64, 64, 192),
    (192, 64, 192), (64, 192, 192), (192, 192, 192), (32, 0, 0), (160, 0, 0), (32, 128, 0),
    (160, 128, 0), (32, 0, 128), (160, 0, 128), (32, 128, 128), (160, 128, 128), (96, 0, 0),
    (224, 0, 0), (96, 128, 0), (224, 128, 0), (96, 0, 128), (224, 0, 128), (96, 128, 128),
    (224, 128, 128), (32, 64, 0), (160, 64, 0), (32, 192, 0), (160, 192, 0), (32, 64, 128),
    (160, 64, 128), (32, 192, 128), (160, 192, 128), (96, 64, 0), (224, 64, 0), (96, 192, 0),
    (224, 192, 0), (96, 64, 128), (224, 64, 128), (96, 192, 128), (224, 192, 128), (32, 0, 64),
    (160, 0, 64), (32, 128, 64), (160, 128, 64), (32, 0, 192), (160, 0, 192), (32, 128, 192),
    (160, 128, 192), (96, 0, 64), (224, 0, 64), (96, 128, 64), (224, 128, 64), (96, 0, 192),
    (224, 0, 192), (96, 128, 192), (224, 128, 192), (32, 64, 64), (160, 64, 64), (32, 192, 64),
    (160, 192, 64), (32, 64, 192), (160, 64, 192), (32, 192, 192), (160, 192, 192), (96, 64, 64),
    (224, 64, 64), (96, 192, 64), (224, 192, 64), (96, 64, 192), (224, 64, 192), (96, 192, 192),
    (224, 192, 192), (0, 32, 0), (128, 32, 0), (0, 160, 0), (128, 160, 0), (0, 32, 128),
    (128, 32, 128), (0, 160, 128), (128, 160, 128), (64, 32, 0), (192, 32, 0), (64, 160, 0),
    (192, 160, 0), (64, 32, 128), (192, 32, 128), (64, 160, 128), (192, 160, 128), (0, 96, 0),
    (128, 96, 0), (0, 224, 0), (128, 224, 0), (0, 96, 128), (128, 96, 128), (0, 224, 128),
    (128, 224, 128), (64, 96, 0), (192, 96, 0), (64, 224, 0), (192, 224, 0), (64, 96, 128),
    (192, 96, 128), (64, 224, 128), (192, 224, 128), (0, 32, 64), (128, 32, 64), (0, 160, 64),
    (128, 160, 64), (0, 32, 192), (128, 32, 192), (0, 160, 192), (128, 160, 192), (64, 32, 64),
    (192, 32, 64), (64, 160, 64), (192, 160, 64), (64, 32, 192), (192, 32, 192), (64, 160, 192),
    (192, 160, 192), (0, 96, 64), (128, 96, 64), (0, 224, 64), (128, 224, 64), (0, 96, 192),
    (128, 96, 192),
)

# 0 = unlabeled and 255 -> ignore; COCO id k (1..182) -> class k - 1.
LABEL_MAP: dict[int, int | None] = {0: None, 255: None, **{k: k - 1 for k in range(1, 183)}}

SPLITS = ("train", "test", "all")

LAYOUT = ("<root>/images/<id>.jpg, <root>/annotations/<id>.mat (field 'S') and "
          "<root>/imageLists/{train,test,all}.txt, as in cocostuff-10k-v1.1.zip")


def read_mat_label(path: str, sample_id: str | None = None) -> np.ndarray:
    """The label map ``S`` of a COCO-Stuff ``.mat`` annotation, as a (H, W) array."""
    from scipy.io import loadmat

    try:
        content = loadmat(path, variable_names=["S"])
    except FileNotFoundError:
        raise CorruptSample(path, "annotation file is missing", sample_id) from None
    except Exception as error:  # scipy raises several types for damaged or non-MAT files
        raise CorruptSample(path, f"cannot read MAT file: {error}", sample_id) from error
    if "S" not in content:
        raise CorruptSample(path, "MAT file has no label map field 'S'", sample_id)
    labels = np.asarray(content["S"])
    if labels.ndim != 2 or labels.dtype.kind not in "iuf":
        raise CorruptSample(path, f"field 'S' is {labels.dtype} of shape {labels.shape}; expected a 2-D "
                                  "numeric label map", sample_id)
    return labels


def find_samples(root: Path, split: str, with_labels: bool) -> list[Sample]:
    """The samples listed in ``imageLists/<split>.txt``."""
    ids = read_id_list(root / "imageLists" / f"{split}.txt", LAYOUT)
    images = require_dir(root / "images", "image folder", LAYOUT)
    labels = require_dir(root / "annotations", "annotation folder", LAYOUT) if with_labels else None
    return [Sample(i, str(images / f"{i}.jpg"), str(labels / f"{i}.mat") if labels else None) for i in ids]


SPEC = DatasetSpec(
    name="cocostuff10k", class_names=CLASS_NAMES, palette=PALETTE, label_map=LABEL_MAP, splits=SPLITS,
    layout=LAYOUT, find_samples=find_samples, read_label=read_mat_label,
)
