"""The "custom" dataset kind, its template config and the dataset inspector on tiny generated sets."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcibi_jax.config import load_config
from mcibi_jax.data import inspect as inspect_cli
from mcibi_jax.data import pipeline
from mcibi_jax.data.datasets import (
    CorruptSample,
    DatasetConfigError,
    DatasetLayoutError,
    build_source,
)
from mcibi_jax.data.datasets.custom import (
    DatasetDescriptionError,
    generated_palette,
    read_description,
)

TEMPLATE = str(Path(__file__).resolve().parents[1] / "configs" / "custom_template.py")
IGNORE = -100
CLASSES = ["background", "road", "car", "person"]

# Masks in raster order (255 = unlabelled), chosen so the class counts are easy to check by hand.
# 4x6: class 0: 8, 1: 8, 2: 4, ignore: 4
MASK_A = np.array(
    [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [2, 2, 255, 255, 1, 1], [2, 2, 255, 255, 1, 1]],
    dtype=np.uint8,
)
# 3x5: class 1: 9, 3: 4, ignore: 2
MASK_B = np.array([[1, 1, 1, 3, 3], [1, 1, 1, 3, 3], [1, 1, 1, 255, 255]], dtype=np.uint8)
MASK_C = np.zeros((5, 4), dtype=np.uint8)  # 5x4: class 0: 20
MASK_V = np.full((4, 4), 3, dtype=np.uint8)


def write_custom(root: Path, *, seed: int = 0, palette: bool = False) -> dict[str, np.ndarray]:
    """images/{a.jpg, b.png, c.png, v.png}, masks/*.png, splits/{train,val}.txt, dataset.json.

    Returns the RGB arrays of the PNG images by name.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    images = {}
    for name, mask, ext in (
        ("a", MASK_A, "jpg"),
        ("b", MASK_B, "png"),
        ("c", MASK_C, "png"),
        ("v", MASK_V, "png"),
    ):
        image = rng.integers(0, 256, size=(*mask.shape, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.{ext}")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{name}.png")
        images[name] = image
    (root / "splits" / "train.txt").write_text("a\nb\n\nc\n")
    (root / "splits" / "val.txt").write_text("v.png\n")  # a name may carry its extension
    description = {"name": "toy", "classes": CLASSES, "ignore_index": 255, "flip_pairs": [[2, 3]]}
    if palette:
        description["palette"] = [[0, 0, 0], [128, 64, 128], [0, 0, 142], [220, 20, 60]]
    (root / "dataset.json").write_text(json.dumps(description))
    return images


def dataset_config(root: Path, **extra) -> dict:
    return {"name": "custom", "root": str(root), "ignore_label": IGNORE, **extra}


# ------------------------------------------------------------------------------------------
# Reader


def test_reader_samples_and_ignore_mapping(tmp_path):
    images = write_custom(tmp_path, palette=True)
    source = build_source(dataset_config(tmp_path, num_classes=4), "train")
    assert len(source) == 3 and [s.id for s in source.samples] == ["a", "b", "c"]
    assert (
        source.name == "custom" and source.class_names == tuple(CLASSES) and source.num_classes == 4
    )
    assert source.flip_label_pairs == ((2, 3),)
    assert source.palette.tolist()[1] == [128, 64, 128]
    for i, mask in enumerate((MASK_A, MASK_B, MASK_C)):
        sample = source[i]
        expected = np.where(mask == 255, IGNORE, mask.astype(np.int32))
        assert sample["label"].dtype == np.int32
        np.testing.assert_array_equal(sample["label"], expected)
        assert sample["image"].shape == (*mask.shape, 3) and sample["image"].dtype == np.uint8
    np.testing.assert_array_equal(source[1]["image"], images["b"])  # PNG: exact
    val = build_source(dataset_config(tmp_path), "val")
    assert val[0]["id"] == "v" and (val[0]["label"] == 3).all()
    clone = pickle.loads(pickle.dumps(source))  # grain workers get copies
    np.testing.assert_array_equal(clone[0]["label"], source[0]["label"])
    unlabelled = build_source(dataset_config(tmp_path), "val", with_labels=False)
    assert (unlabelled[0]["label"] == IGNORE).all()


def test_generated_palette_and_description_errors(tmp_path):
    write_custom(tmp_path)
    assert read_description(tmp_path)["palette"] == generated_palette(4)
    assert generated_palette(4)[:2] == ((0, 0, 0), (128, 0, 0))
    path = tmp_path / "dataset.json"
    for text, match in (
        ("{", "cannot be read as JSON"),
        ('{"classes": []}', "non-empty list"),
        ('{"classes": ["a", "b"], "ignore_index": 1}', "is a class id"),
        ('{"classes": ["a", "b"], "palette": [[0, 0, 0]]}', "palette"),
        ('{"classes": ["a", "b"], "flip_pairs": [[0, 2]]}', "flip_pairs"),
        ('{"classes": ["a"], "colours": 1}', "unknown field"),
    ):
        path.write_text(text)
        with pytest.raises(DatasetDescriptionError, match=match):
            build_source(dataset_config(tmp_path), "train")
    path.unlink()
    with pytest.raises(DatasetLayoutError, match="dataset.json does not exist"):
        build_source(dataset_config(tmp_path), "train")


def test_reader_errors(tmp_path):
    write_custom(tmp_path)
    with pytest.raises(
        DatasetConfigError, match="custom has no split 'test'; choose one of train, val"
    ):
        build_source(dataset_config(tmp_path), "test")
    with pytest.raises(DatasetConfigError, match="num_classes=5 but custom has 4"):
        build_source(dataset_config(tmp_path, num_classes=5), "train")
    with pytest.raises(DatasetConfigError, match="no 'root'"):
        build_source({"name": "custom", "root": ""}, "train")
    with pytest.raises(DatasetLayoutError, match="does not exist or is not a folder"):
        build_source(dataset_config(tmp_path / "nope"), "train")
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(
        DatasetLayoutError, match=r"1 of 3 samples have no label file; first: .*b\.png"
    ):
        build_source(dataset_config(tmp_path), "train")
    Image.fromarray(np.full((3, 5), 4, np.uint8), mode="L").save(tmp_path / "masks" / "b.png")
    source = build_source(dataset_config(tmp_path), "train")
    with pytest.raises(CorruptSample, match=r"label ids \{4\}"):
        source[1]
    Image.fromarray(np.zeros((3, 5, 3), np.uint8)).save(tmp_path / "masks" / "b.png")
    with pytest.raises(CorruptSample, match="mode 'RGB'"):
        source[1]


# ------------------------------------------------------------------------------------------
# Template config and pipeline


def test_template_config_follows_root_and_overrides(tmp_path):
    write_custom(tmp_path)
    config = load_config(
        f"{TEMPLATE}:r50",
        [f"dataset.root={tmp_path}", "dataset.train.crop_size=(8, 8)", "train.batch_size=2"],
    )
    assert config.dataset.name == "custom" and config.dataset.root == str(tmp_path)
    assert config.dataset.num_classes == 4 and config.model.num_classes == 4  # from dataset.json
    assert config.dataset.train.flip_label_pairs == ((2, 3),)
    assert config.dataset.train.pad_size == (8, 8)  # follows crop_size
    assert config.to_dict()["model"]["num_classes"] == 4
    fixed = load_config(f"{TEMPLATE}:r101", [f"dataset.root={tmp_path}", "dataset.num_classes=6"])
    assert fixed.model.num_classes == 6 and fixed.model.backbone.depth == 101
    missing = load_config(f"{TEMPLATE}:r50", [f"dataset.root={tmp_path / 'nope'}"])
    with pytest.raises(DatasetDescriptionError, match="nope/dataset.json does not exist"):
        _ = missing.model.num_classes
    with pytest.raises(ValueError, match="choose a backbone"):
        load_config(f"{TEMPLATE}:r18")


def test_build_source_and_train_loader(tmp_path):
    write_custom(tmp_path)
    config = load_config(
        f"{TEMPLATE}:r50",
        [
            f"dataset.root={tmp_path}",
            "dataset.train.crop_size=(8, 8)",
            "dataset.train.output_size=(16, 8)",
            "train.batch_size=2",
        ],
    )
    loader = pipeline.train_loader(
        config,
        num_workers=0,
        num_threads=0,
        shard_options=pipeline.grain.sharding.ShardOptions(0, 1),
    )
    assert len(loader.source) == 3 and loader.shape == (8, 8)
    iterator = iter(loader)
    for _ in range(2):
        batch = next(iterator)
        assert batch["image"].shape == (2, 8, 8, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (2, 8, 8)
        values = set(np.unique(batch["label"]).tolist())
        assert values <= {0, 1, 2, 3, IGNORE}
    iterator.close()


# ------------------------------------------------------------------------------------------
# Inspector


def run_inspect(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = inspect_cli.main(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0].isdigit():
            rows[parts[1]] = parts[2:]
    return rows


def test_inspect_clean_set(tmp_path):
    write_custom(tmp_path)
    code, out, err = run_inspect(
        [f"--config={TEMPLATE}:r50", f"--config.dataset.root={tmp_path}", "--quiet"]
    )
    assert code == 0, out + err
    assert "custom split 'train'" in out and "no problems in 3 samples" in out
    # by hand: background 8 + 20, road 8 + 9, car 4, person 4 (labelled 53; ignored 4 + 2)
    assert "53 labelled pixels, 6 ignored (10.17% of all)" in out
    rows = table_rows(out)
    assert rows["background"] == ["28", "52.83", "2", "66.67"]
    assert rows["road"] == ["17", "32.08", "2", "66.67"]
    assert rows["car"] == ["4", "7.55", "1", "33.33"]
    assert rows["person"] == ["4", "7.55", "1", "33.33"]
    assert "height min 3, mean 4.0, max 5; width min 4, mean 5.0, max 6" in out
    code, out, _ = run_inspect(
        [
            f"--config={TEMPLATE}:r50",
            "--config.dataset.root",
            str(tmp_path),
            "--split=val",
            "--quiet",
        ]
    )
    assert code == 0 and "no problems in 1 samples" in out
    assert table_rows(out)["person"] == ["16", "100.00", "1", "100.00"]


def test_inspect_broken_set(tmp_path):
    write_custom(tmp_path)
    (tmp_path / "masks" / "b.png").unlink()  # missing mask
    # image is 5x4
    Image.fromarray(np.zeros((4, 7), np.uint8), mode="L").save(tmp_path / "masks" / "c.png")
    mask = MASK_A.copy()
    mask[0, 0] = 9  # 9 with 4 classes
    Image.fromarray(mask, mode="L").save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "images" / "d.png")
    (tmp_path / "masks" / "d.png").write_bytes(b"not a png at all")  # corrupt file
    (tmp_path / "splits" / "train.txt").write_text("a\nb\nc\nd\n")
    code, out, _ = run_inspect(
        [f"--config={TEMPLATE}:r50", f"--config.dataset.root={tmp_path}", "--quiet"]
    )
    assert code == 1, out
    assert "PROBLEMS: 4 in 4 of 4 samples" in out
    assert "missing image or mask (no pair): 1" in out and "b.png: mask file does not exist" in out
    assert "image/mask size mismatches: 1" in out and "mask is 4x7 but image" in out
    assert "mask ids outside the class list: 1" in out and "ids 9 (1 px)" in out and "a.png" in out
    assert "unreadable files: 1" in out and "d.png: cannot decode mask" in out
    code, out, _ = run_inspect(
        [
            f"--config={TEMPLATE}:r50",
            f"--config.dataset.root={tmp_path}",
            "--quiet",
            "--max_listed=0",
        ]
    )
    assert code == 1 and "... and 1 more" in out


def test_inspect_usage_errors(tmp_path):
    code, _, err = run_inspect(
        [f"--config={TEMPLATE}:r50", f"--config.dataset.root={tmp_path}", "--quiet"]
    )
    assert code == 2 and "dataset.json does not exist" in err
    write_custom(tmp_path)
    code, _, err = run_inspect(
        [f"--config={TEMPLATE}:r50", f"--config.dataset.root={tmp_path}", "--split=test"]
    )
    assert code == 2 and "no split 'test'" in err
    code, _, err = run_inspect([f"--config={TEMPLATE}:r50", "--config.dataset.nope=1"])
    assert code == 2 and "unknown config key" in err
    code, _, err = run_inspect(["--config=configs/does_not_exist.py"])
    assert code == 2


def test_predict_uses_the_palette_of_dataset_json(tmp_path):
    import json

    from mcibi_jax.data.classes import dataset_palette

    root = tmp_path / "set"
    root.mkdir()
    (root / "dataset.json").write_text(
        json.dumps({"classes": ["a", "b"], "palette": [[1, 2, 3], [4, 5, 6]]})
    )
    palette = dataset_palette({"name": "custom", "root": str(root)}, 2)
    assert palette.tolist() == [[1, 2, 3], [4, 5, 6]]
