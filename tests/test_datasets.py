"""Dataset readers on tiny datasets written in each official layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcibi_jax.data.datasets import (
    SPECS,
    CorruptSample,
    DatasetConfigError,
    DatasetLayoutError,
    build_source,
)
from tests.helpers import (
    save_jpg,
    save_png,
    write_ade20k,
    write_cityscapes,
    write_cocostuff,
    write_lip,
)

scipy_io = pytest.importorskip("scipy.io")

IGNORE = -100

# Official Cityscapes labelId -> trainId (255 = ignored), ids 0..33, from cityscapesScripts.
CITYSCAPES_TRAIN_IDS = [
    255,
    255,
    255,
    255,
    255,
    255,
    255,
    0,
    1,
    255,
    255,
    2,
    3,
    4,
    255,
    255,
    255,
    5,
    255,
    6,
    7,
    8,
    9,
    10,
    11,
    12,
    13,
    14,
    15,
    255,
    255,
    16,
    17,
    18,
]


def config(name: str, root: Path, **extra) -> dict:
    return {
        "name": name,
        "root": str(root),
        "num_classes": SPECS[name].num_classes,
        "ignore_label": IGNORE,
        **extra,
    }


def _read_png(path: str) -> np.ndarray:
    return np.array(Image.open(path))


def _check_sample(sample: dict, num_classes: int) -> None:
    image, label = sample["image"], sample["label"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert label.dtype == np.int32 and label.shape == image.shape[:2]
    assert isinstance(sample["id"], str)
    valid = label[label != IGNORE]
    assert valid.size == 0 or (valid.min() >= 0 and valid.max() < num_classes)


# ------------------------------------------------------------------------------------------
# Cityscapes


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("cityscapes")
    return root, write_cityscapes(root)


def test_cityscapes_samples_and_every_label_id(cityscapes_root):
    root, ids = cityscapes_root
    source = build_source(config("cityscapes", root), "train")
    assert len(source) == 3 and [s.id for s in source.samples] == ids["train"]
    for i in range(len(source)):
        _check_sample(source[i], 19)
    sample = source[0]
    assert sample["id"] == "aachen/aachen_000000_000019_leftImg8bit"
    image_file = root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    np.testing.assert_array_equal(sample["image"], _read_png(str(image_file)))  # PNG: exact RGB
    expected = np.array([IGNORE if t == 255 else t for t in CITYSCAPES_TRAIN_IDS])
    np.testing.assert_array_equal(sample["label"].reshape(-1)[:34], expected)
    assert sorted(set(expected[expected >= 0])) == list(range(19))
    assert source.palette.shape == (19, 3) and source.palette.dtype == np.uint8
    assert len(source.class_names) == 19 and source.flip_label_pairs == ()


def test_cityscapes_sets(cityscapes_root):
    root, ids = cityscapes_root
    for split in ("train", "val", "test", "trainval"):
        source = build_source(config("cityscapes", root), split)
        assert [s.id for s in source.samples] == ids[split]
    trainval = build_source(config("cityscapes", root), "trainval")
    assert len(trainval) == 4 and trainval[3]["image"].shape == (7, 5, 3)


def test_cityscapes_list_files(tmp_path):
    ids = write_cityscapes(tmp_path, lists=True)
    # blank lines and spaces are ignored
    (tmp_path / "val.txt").write_text(f"\n{ids['val'][0]}  \n\n")
    for split in ("train", "val", "trainval"):
        source = build_source(config("cityscapes", tmp_path), split)
        assert [s.id for s in source.samples] == ids[split]
        assert f"/leftImg8bit/{split}/" in source.samples[0].image
        _check_sample(source[len(source) - 1], 19)


def test_cityscapes_unknown_label_id(tmp_path):
    write_cityscapes(tmp_path)
    label = tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    array = _read_png(str(label))
    array[2, 3] = 40
    array[0, 0] = 255
    save_png(label, array)
    source = build_source(config("cityscapes", tmp_path), "val")
    with pytest.raises(
        CorruptSample, match=r"label ids \{40, 255\} are not in the cityscapes mapping"
    ) as info:
        source[0]
    assert info.value.path == str(label) and info.value.sample_id == source.samples[0].id


def test_cityscapes_layout_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="dataset root .* does not exist.*leftImg8bit"):
        build_source(config("cityscapes", tmp_path / "nowhere"), "train")
    with pytest.raises(DatasetLayoutError, match="image folder .*leftImg8bit/train"):
        build_source(config("cityscapes", tmp_path), "train")
    write_cityscapes(tmp_path)
    missing = tmp_path / "gtFine/train/bochum/bochum_000002_000019_gtFine_labelIds.png"
    missing.unlink()
    with pytest.raises(
        DatasetLayoutError,
        match=f"1 of 3 samples have no label file; first: label of image .*bochum.* should be {missing}",
    ):
        build_source(config("cityscapes", tmp_path), "train")
    with pytest.raises(DatasetLayoutError, match="no label file"):
        build_source(config("cityscapes", tmp_path), "trainval")
    source = build_source(config("cityscapes", tmp_path), "train", check=False)
    with pytest.raises(CorruptSample, match="label file is missing"):
        source[2]
    (tmp_path / "train.txt").write_text("aachen/aachen_000000_000019_leftImg8bit\n")
    with pytest.raises(DatasetLayoutError, match="image folder of list file .*trainval"):
        (tmp_path / "trainval.txt").write_text("x\n")
        build_source(config("cityscapes", tmp_path), "trainval")


# ------------------------------------------------------------------------------------------
# ADE20K


def test_ade20k_every_label_id_and_sets(tmp_path):
    ids = write_ade20k(tmp_path)
    source = build_source(config("ade20k", tmp_path), "train")
    assert [s.id for s in source.samples] == ids["train"]
    sample = source[0]
    _check_sample(sample, 150)
    assert sample["image"].shape == (11, 14, 3)
    expected = np.concatenate([[IGNORE], np.arange(150)])
    np.testing.assert_array_equal(sample["label"].reshape(-1)[:151], expected)
    image_file = tmp_path / "ADEChallengeData2016/images/training/ADE_train_00000001.jpg"
    np.testing.assert_array_equal(sample["image"], np.array(Image.open(image_file).convert("RGB")))
    # root may be the folder itself
    val = build_source(config("ade20k", tmp_path / "ADEChallengeData2016"), "val")
    assert len(val) == 1 and val[0]["label"].shape == (9, 6)
    assert source.palette.shape == (150, 3) and len(source.class_names) == 150


def test_ade20k_list_files_and_unlabelled_test(tmp_path):
    ids = write_ade20k(tmp_path, lists=True)
    source = build_source(config("ade20k", tmp_path), "train")
    assert [s.id for s in source.samples] == ids["train"]  # list order, not sorted
    (tmp_path / "ADEChallengeData2016/images/testing").mkdir()
    save_jpg(
        tmp_path / "ADEChallengeData2016/images/testing/ADE_test_00000001.jpg",
        np.zeros((4, 6, 3), np.uint8),
    )
    with pytest.raises(DatasetLayoutError, match="annotation folder .*annotations/testing"):
        build_source(config("ade20k", tmp_path), "test")
    test = build_source(config("ade20k", tmp_path), "test", with_labels=False)
    sample = test[0]
    assert (
        sample["id"] == "ADE_test_00000001"
        and np.all(sample["label"] == IGNORE)
        and sample["label"].shape == (4, 6)
    )


def test_ade20k_bad_inputs(tmp_path):
    with pytest.raises(DatasetLayoutError, match="ADEChallengeData2016 does not exist"):
        build_source(config("ade20k", tmp_path), "train")
    write_ade20k(tmp_path)
    label = tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    array = _read_png(str(label))
    array[1, 1] = 151
    save_png(label, array)
    with pytest.raises(
        CorruptSample, match=r"\{151\} are not in the ade20k mapping \(valid raw ids: 0\.\.150\)"
    ):
        build_source(config("ade20k", tmp_path), "val")[0]
    image = tmp_path / "ADEChallengeData2016/images/training/ADE_train_00000002.jpg"
    image.write_bytes(image.read_bytes()[:40])  # truncated JPEG
    source = build_source(config("ade20k", tmp_path), "train")
    with pytest.raises(CorruptSample, match="ADE_train_00000002.jpg: cannot decode image"):
        source[1]
    image.write_bytes(b"not an image at all")
    with pytest.raises(CorruptSample, match="cannot decode image"):
        source[1]
    save_png(label, np.zeros((9, 6, 3), np.uint8))  # RGB where a label-id PNG is expected
    with pytest.raises(CorruptSample, match="mode 'RGB'; expected a single-channel"):
        build_source(config("ade20k", tmp_path), "val")[0]
    save_png(label, np.zeros((9, 7), np.uint8))  # wrong size
    with pytest.raises(CorruptSample, match=r"label has shape \(9, 7\) but image .* is 9x6"):
        build_source(config("ade20k", tmp_path), "val")[0]
    label.write_bytes(b"\x89PNG broken")
    with pytest.raises(CorruptSample, match="cannot decode label image"):
        build_source(config("ade20k", tmp_path), "val")[0]
    (tmp_path / "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="no .jpg images in .*images/validation"):
        build_source(config("ade20k", tmp_path), "val")
    (tmp_path / "ADEChallengeData2016/val.txt").write_text("ADE_val_00000001\n")
    with pytest.raises(
        DatasetLayoutError,
        match="1 of 1 samples have no image file; first: image should be .*ADE_val_00000001.jpg",
    ):
        build_source(config("ade20k", tmp_path), "val")


# ------------------------------------------------------------------------------------------
# COCO-Stuff-10k


def test_cocostuff_every_label_id_and_sets(tmp_path):
    ids = write_cocostuff(tmp_path)
    for split in ("train", "test", "all"):
        source = build_source(config("cocostuff10k", tmp_path), split)
        assert [s.id for s in source.samples] == ids[split]
        for i in range(len(source)):
            _check_sample(source[i], 182)
    sample = build_source(config("cocostuff10k", tmp_path), "train")[0]
    assert sample["image"].shape == (14, 14, 3)
    # 0 -> ignore, k -> k-1, 255 -> ignore
    expected = np.concatenate([[IGNORE], np.arange(182), [IGNORE]])
    np.testing.assert_array_equal(sample["label"].reshape(-1)[:184], expected)


def test_cocostuff_palette_is_the_voc_colour_map():
    palette = np.asarray(SPECS["cocostuff10k"].palette)
    assert palette.shape == (182, 3)
    for k in range(182):
        rgb, value, shift = [0, 0, 0], k, 7
        while value:
            for c in range(3):
                rgb[c] |= ((value >> c) & 1) << shift
            value >>= 3
            shift -= 1
        assert tuple(palette[k]) == tuple(rgb)


def test_cocostuff_bad_inputs(tmp_path):
    with pytest.raises(
        DatasetLayoutError, match="list file .*imageLists/train.txt does not exist.*imageLists"
    ):
        build_source(config("cocostuff10k", tmp_path), "train")
    ids = write_cocostuff(tmp_path)
    mat = tmp_path / "annotations" / f"{ids['test'][0]}.mat"
    scipy_io.savemat(mat, {"S": np.full((7, 6), 200, np.uint16)})
    with pytest.raises(
        CorruptSample,
        match=r"\{200\} are not in the cocostuff10k mapping \(valid raw ids: 0\.\.182, 255\)",
    ):
        build_source(config("cocostuff10k", tmp_path), "test")[0]
    scipy_io.savemat(mat, {"S": np.full((7, 6), 1000, np.uint16)})
    with pytest.raises(CorruptSample, match=r"\{1000\} are not in the cocostuff10k mapping"):
        build_source(config("cocostuff10k", tmp_path), "test")[0]
    # MATLAB's default type: 1, 5, ..., 165
    doubles = np.arange(42, dtype=np.float64).reshape(7, 6) * 4 + 1
    scipy_io.savemat(mat, {"S": doubles})
    np.testing.assert_array_equal(
        build_source(config("cocostuff10k", tmp_path), "test")[0]["label"], doubles - 1
    )
    scipy_io.savemat(mat, {"names": np.array(["x"], dtype=object)})
    with pytest.raises(CorruptSample, match="no label map field 'S'"):
        build_source(config("cocostuff10k", tmp_path), "test")[0]
    scipy_io.savemat(mat, {"S": np.full((7, 6), 1.5)})
    with pytest.raises(CorruptSample, match="non-integer"):
        build_source(config("cocostuff10k", tmp_path), "test")[0]
    mat.write_bytes(b"MATLAB garbage")
    with pytest.raises(CorruptSample, match="cannot read MAT file"):
        build_source(config("cocostuff10k", tmp_path), "test")[0]
    mat.unlink()
    with pytest.raises(
        DatasetLayoutError,
        match=f"label of image .*{ids['test'][0]}.jpg should be .*annotations/{ids['test'][0]}.mat",
    ):
        build_source(config("cocostuff10k", tmp_path), "test")


# ------------------------------------------------------------------------------------------
# LIP


def test_lip_every_label_id_flip_pairs_and_sets(tmp_path):
    ids = write_lip(tmp_path)
    source = build_source(config("lip", tmp_path), "train")
    assert [s.id for s in source.samples] == ids["train"]
    sample = source[0]
    _check_sample(sample, 20)
    np.testing.assert_array_equal(sample["label"].reshape(-1)[:20], np.arange(20))
    assert source.flip_label_pairs == ((15, 14), (17, 16), (19, 18))
    names = source.class_names
    for right, left in source.flip_label_pairs:
        assert (
            names[right].startswith("right")
            and names[left] == "left" + names[right][len("right") :]
        )
    assert len(build_source(config("lip", tmp_path), "val")) == 1
    test = build_source(config("lip", tmp_path), "test", with_labels=False)
    assert test[0]["image"].shape == (4, 9, 3) and np.all(test[0]["label"] == IGNORE)


def test_lip_bad_inputs(tmp_path):
    with pytest.raises(
        DatasetLayoutError,
        match="train_id.txt does not exist; expected layout: .*_segmentations/<id>.png",
    ):
        build_source(config("lip", tmp_path), "train")
    ids = write_lip(tmp_path)
    with pytest.raises(DatasetLayoutError, match="label folder .*testing_segmentations"):
        build_source(config("lip", tmp_path), "test")
    label = tmp_path / "val_segmentations" / f"{ids['val'][0]}.png"
    save_png(label, np.full((6, 5), 20, np.uint8))
    with pytest.raises(
        CorruptSample, match=r"\{20\} are not in the lip mapping \(valid raw ids: 0\.\.19\)"
    ):
        build_source(config("lip", tmp_path), "val")[0]


# ------------------------------------------------------------------------------------------
# Config, protocol


def test_config_errors(tmp_path):
    write_lip(tmp_path)
    with pytest.raises(DatasetConfigError, match="unknown dataset 'voc'"):
        build_source({"name": "voc", "root": str(tmp_path)}, "train")
    with pytest.raises(
        DatasetConfigError, match="lip has no split 'trainval'; choose one of train, val, test"
    ):
        build_source(config("lip", tmp_path), "trainval")
    with pytest.raises(DatasetConfigError, match="num_classes=19 but lip has 20"):
        build_source(config("lip", tmp_path, num_classes=19), "train")


def test_recipe_configs_and_source_protocol(tmp_path):
    from mcibi_jax.recipes import released_config

    write_lip(tmp_path)
    cfg = released_config("lip", "r50").dataset
    cfg.root = str(tmp_path)
    source = build_source(cfg, cfg.train_set)
    assert len(source) == 2 and source[-1]["id"] == source.samples[1].id
    with pytest.raises(IndexError):
        source[2]
    clone = pickle.loads(pickle.dumps(source))  # worker processes get a copy
    np.testing.assert_array_equal(clone[1]["label"], source[1]["label"])
    for name in ("cityscapes", "ade20k", "cocostuff10k"):
        cfg = released_config(name, "r50").dataset
        assert cfg.num_classes == SPECS[name].num_classes and cfg.ignore_label == IGNORE
        assert cfg.train_set in SPECS[name].splits and cfg.eval_set in SPECS[name].splits
    error = pickle.loads(pickle.dumps(CorruptSample("/x.png", "broken", "x")))
    assert (error.path, error.reason, error.sample_id, str(error)) == (
        "/x.png",
        "broken",
        "x",
        "/x.png: broken (sample 'x')",
    )


def test_grey_and_palette_images_become_rgb(tmp_path):
    write_lip(tmp_path)
    source = build_source(config("lip", tmp_path), "val")
    grey = np.arange(30, dtype=np.uint8).reshape(6, 5)
    save_jpg(Path(source.samples[0].image), grey)
    image = source[0]["image"]
    assert (
        image.shape == (6, 5, 3)
        and np.all(image[..., 0] == image[..., 1])
        and np.all(image[..., 1] == image[..., 2])
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32])
def test_label_mapping_paths_agree(dtype):
    from mcibi_jax.data.datasets.core import lookup_table, map_label

    table = lookup_table({**{i: i - 1 for i in range(1, 34)}, 0: None, 255: None}, -100)
    raw = np.random.default_rng(0).integers(0, 34, (37, 53))
    raw[:3] = 255
    mapped = map_label(raw.astype(dtype), table, "x.png", "x", "cityscapes")
    assert mapped.dtype == np.int32
    np.testing.assert_array_equal(mapped, table[raw])
    # a view (not contiguous) too
    np.testing.assert_array_equal(
        map_label(raw.astype(dtype)[:, 5:40], table, "x.png", "x", "cityscapes"),
        table[raw[:, 5:40]],
    )
    raw[5, 7] = 40
    with pytest.raises(CorruptSample, match=r"label ids \{40\} are not in the cityscapes mapping"):
        map_label(raw.astype(dtype), table, "x.png", "x", "cityscapes")
