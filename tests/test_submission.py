"""Test-server files (mcibi_jax.evaluation.submission) and ``eval.format_only`` in an experiment."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

import mcibi_jax
from mcibi_jax.data.datasets import cityscapes
from mcibi_jax.evaluation import submission
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.train.experiment import run
from tests.helpers import write_cityscapes


def test_cityscapes_train_ids_go_back_to_label_ids():
    expected = {
        train_id: label_id for label_id, _, train_id in cityscapes.LABELS if train_id is not None
    }
    assert sorted(expected) == list(range(19))
    classes = np.arange(19).reshape(1, 19)
    np.testing.assert_array_equal(
        submission.cityscapes_train_to_label_ids(classes)[0], [expected[t] for t in range(19)]
    )
    assert submission.cityscapes_train_to_label_ids(np.array([0, 18, 13]))[[0, 1, 2]].tolist() == [
        7,
        33,
        26,
    ]


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("ade20k", lambda k: k + 1),  # the SceneParsing server: 1..150, 0 = other
        ("cocostuff10k", lambda k: k + 1),  # COCO-Stuff ids 1..182, 0 = unlabeled
        ("lip", lambda k: k),  # LIP: 0..19 as they are
    ],
)
def test_other_datasets_map_every_class(dataset, expected):
    n = mcibi_jax.data.datasets.SPECS[dataset].num_classes
    classes = np.arange(n)
    raw = submission.to_raw_ids(classes, dataset)
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw, [expected(k) for k in range(n)])


@pytest.mark.parametrize("dataset", sorted(mcibi_jax.data.datasets.SPECS))
def test_mapping_inverts_the_reader(dataset):
    spec = mcibi_jax.data.datasets.SPECS[dataset]
    raw = submission.raw_id_table(spec)
    assert [spec.label_map[int(r)] for r in raw] == list(range(spec.num_classes))
    with pytest.raises(ValueError, match="outside"):
        submission.to_raw_ids(np.array([spec.num_classes]), dataset)


def test_file_names():
    assert (
        submission.file_name("berlin/berlin_000000_000019_leftImg8bit", "cityscapes")
        == "berlin_000000_000019_leftImg8bit.png"
    )
    assert submission.file_name("ADE_test_00000001", "ade20k") == "ADE_test_00000001.png"


def test_saved_png_holds_raw_ids(tmp_path):
    prediction = np.array([[0, 1, 18], [10, 13, 2]])
    path = submission.save_prediction(tmp_path / "a.png", prediction, "cityscapes")
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.array(image), [[7, 8, 33], [23, 26, 11]])
    path = submission.save_prediction(tmp_path / "b.png", np.array([[0, 149]]), "ade20k")
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.array(image), [[1, 150]])


def tiny_cityscapes_config(root):
    config = mcibi_jax.load_config(
        "configs/cityscapes.py:r50",
        [
            f"dataset.root={str(root)!r}",
            "dataset.eval_set='test'",
            "dataset.test.output_size=(32, 32)",
            "model.head.in_channels=128",
            "model.head.feats_channels=16",
            "model.head.transform_channels=8",
            "model.head.out_channels=16",
        ],
    )
    with config.unlocked():  # backbone options the recipe leaves at the backbone's defaults
        config.model.backbone.update(base_channels=4, stem_channels=8)
    config.model.auxiliary[0].update(in_channels=64, out_channels=16)
    config.model.inference.update(mode="whole", multiscale=[1.0], flip=False)
    config.eval.format_only = True
    return config


def test_format_only_writes_the_cityscapes_test_set(tmp_path):
    root = tmp_path / "cityscapes"
    write_cityscapes(root)
    for label in (root / "gtFine" / "test").rglob("*.png"):
        label.unlink()  # the test set has no labels
    config = tiny_cityscapes_config(root)
    model = build_model(config.model)
    from mcibi_jax.porting.variables import save_variables
    from mcibi_jax.train.state import init_variables

    work = tmp_path / "work"
    save_variables(
        work / "checkpoints" / "final",
        init_variables(model, jax.random.key(0, impl="rbg"), (32, 32)),
    )
    lines = []
    results = run(config, work, "eval", log=lines.append)
    out = work / "submission" / "cityscapes"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["berlin_000000_000019_leftImg8bit.png"]
    assert results["submission"] == {"directory": str(out), "num_images": 1, "split": "test"}
    assert "eval" not in results
    with Image.open(out / files[0]) as image:
        values = np.array(image)
    assert values.shape == (3, 13)  # the original image size
    assert set(np.unique(values)) <= {
        7,
        8,
        11,
        12,
        13,
        17,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        31,
        32,
        33,
    }
    assert any("no metrics" in line for line in lines)


def test_confusion_csv_and_heat_map(tmp_path):
    from mcibi_jax.evaluation import confusion
    from mcibi_jax.evaluation.metrics import ConfusionMatrix

    counts = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 2]])
    names = ["road", "sky", "car, truck"]
    csv_path, png_path = confusion.save_confusion(tmp_path, counts, names)
    read_names, read_counts = confusion.read_csv(csv_path)
    assert read_names == names
    np.testing.assert_array_equal(read_counts, counts)
    np.testing.assert_allclose(
        confusion.row_normalised(counts), [[0.8, 0.2, 0], [0, 0, 0], [0.25, 0.25, 0.5]]
    )
    with Image.open(png_path) as image:
        assert image.mode == "RGB" and image.width == image.height and image.width >= 3 * 10
        pixels = np.array(image)
    cell = 40  # 3 classes -> the largest cells
    margin = pixels.shape[0] - 3 * cell

    def at(i, j):  # a corner of cell (i, j), away from the text
        return pixels[margin + i * cell + 2, margin + j * cell + cell - 3]

    # 80% darker than 20% darker than 0%
    assert (at(0, 0) < at(0, 1)).all() and (at(0, 1) < at(0, 2)).all()
    assert (at(1, 0) == 255).all() and (at(0, 2) == 255).all()  # an absent class and 0% stay white
    matrix = ConfusionMatrix(3)
    matrix.add(counts)
    # sky: predicted, never true
    assert matrix.compute()["mIoU"] == pytest.approx(np.mean([8 / 11, 0.0, 2 / 4]))
