"""TFDS array_record builders on a tiny ADE20K layout: prepare, read back, feed the pipeline."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip(
    "tensorflow_datasets", reason="tensorflow-datasets is not installed (pip install -e '.[tfds]')"
)
pytest.importorskip(
    "array_record", reason="array_record is not installed (pip install -e '.[tfds]')"
)
pytest.importorskip(
    "importlib_resources", reason="importlib_resources is not installed (pip install -e '.[tfds]')"
)

from mcibi_jax.data import pipeline  # noqa: E402
from mcibi_jax.data.datasets import (
    CorruptSample,
    DatasetConfigError,
    DatasetLayoutError,
    build_source,
)  # noqa: E402
from mcibi_jax.data.prepare import prepare  # noqa: E402
from mcibi_jax.data.tfds_builders import TfdsSource, tfds_source  # noqa: E402
from tests.helpers import (
    small_ade20k_config,  # noqa: E402
    write_ade20k,  # noqa: E402
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("ade20k")
    ids = write_ade20k(root)
    # a greyscale JPEG (stored re-encoded as an RGB PNG) next to the RGB ones (stored as they are)
    grey = np.random.default_rng(5).integers(0, 256, size=(5, 8), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(
        root / "ADEChallengeData2016/images/training/ADE_train_00000002.jpg"
    )
    data_dir = tmp_path_factory.mktemp("records")
    prepare(
        {"name": "ade20k", "root": str(root), "num_classes": 150},
        data_dir,
        num_threads=2,
        log_every=1,
    )
    return root, data_dir, ids


def assert_same_samples(ours, reference) -> None:
    assert len(ours) == len(reference)
    for i in range(len(reference)):
        a, b = ours[i], reference[i]
        assert a["id"] == b["id"] and isinstance(a["id"], str)
        assert a["image"].dtype == np.uint8 and a["image"].shape == b["image"].shape
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["label"].dtype == np.int32
        np.testing.assert_array_equal(a["label"], b["label"])


def test_records_equal_build_source(prepared):
    root, data_dir, ids = prepared
    config = {"name": "ade20k", "root": str(root)}
    for split in ("train", "val"):
        source = tfds_source("ade20k", split, data_dir)
        assert [source[i]["id"] for i in range(len(source))] == ids[split]
        assert_same_samples(source, build_source(config, split))
    train = tfds_source("mcibi_ade20k", "train", data_dir, ignore_label=255)
    np.testing.assert_array_equal(
        train[0]["label"], build_source({**config, "ignore_label": 255}, "train")[0]["label"]
    )
    assert (train[0]["label"] == 255).any()  # label 0 ("other") is ignored
    assert (
        train.num_classes == 150
        and len(train.class_names) == 150
        and train.palette.shape == (150, 3)
    )
    assert train[-1]["id"] == ids["train"][-1]
    with pytest.raises(IndexError):
        train[len(train)]
    copy = pickle.loads(pickle.dumps(train))  # what grain's worker processes get
    np.testing.assert_array_equal(copy[1]["image"], train[1]["image"])
    stored = next((data_dir / "mcibi_ade20k").glob("*/mcibi_ade20k-train.array_record-*"))
    assert stored.is_file()


def test_errors(prepared, tmp_path):
    _, data_dir, _ = prepared
    with pytest.raises(DatasetConfigError, match="no split 'test'"):
        tfds_source("ade20k", "test", data_dir)  # ADE20K test images were not in the root
    with pytest.raises(DatasetLayoutError, match="no prepared mcibi_lip records"):
        tfds_source("lip", "train", data_dir)
    with pytest.raises(DatasetConfigError, match="unknown dataset"):
        tfds_source("voc", "train", data_dir)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        prepare({"name": "ade20k", "root": str(tmp_path / "missing")}, tmp_path / "out")


def test_corrupt_record_raises_corrupt_sample(prepared):
    _, data_dir, _ = prepared
    source = tfds_source("ade20k", "val", data_dir)

    class Damaged:
        def __init__(self, records):
            self.records = records

        def __len__(self):
            return len(self.records)

        def __getitem__(self, i):
            return {**self.records[i], "image": b"not an image"}

    source._records = Damaged(source._records)
    with pytest.raises(
        CorruptSample, match=r"mcibi_ade20k.*\[val\]/0.*cannot decode image"
    ) as error:
        source[0]
    assert error.value.sample_id == "ADE_val_00000001"


def test_train_loader_over_records(prepared):
    root, data_dir, _ = prepared
    config = small_ade20k_config(batch_size=2, root=root)
    source = tfds_source(config.dataset.name, config.dataset.train_set, data_dir)
    assert isinstance(source, TfdsSource)
    iterator = iter(pipeline.train_loader(config, source=source, num_threads=2))
    batches = [next(iterator) for _ in range(3)]
    # build_source over the same root
    reference = iter(pipeline.train_loader(config, num_threads=0))
    for batch in batches:
        assert batch["image"].shape == (2, 24, 24, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (2, 24, 24) and batch["label"].dtype == np.int32
        expected = next(reference)  # same records in the same order -> the same stream
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["label"], expected["label"])
    items = list(
        pipeline.eval_loader(config, source=tfds_source("ade20k", "val", data_dir), num_threads=0)
    )
    assert [item["id"] for item in items] == ["ADE_val_00000001"]


def test_prepare_cli(tmp_path):
    root = tmp_path / "ade"
    write_ade20k(root)
    data_dir = tmp_path / "records"
    command = [
        sys.executable,
        "-m",
        "mcibi_jax.data.prepare",
        "--config=configs/ade20k.py:r50",
        f"--config.dataset.root={root}",
        f"--data_dir={data_dir}",
        "--num_threads=0",
        "--log_every=1",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[mcibi_ade20k/train] 2/2 samples" in done.stdout
    assert "done: mcibi_ade20k" in done.stdout and "train: 2" in done.stdout
    assert len(tfds_source("ade20k", "val", data_dir)) == 1
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already prepared" in again.stdout
    missing = subprocess.run(
        command[:4] + [f"--config.dataset.root={tmp_path / 'nothing'}", f"--data_dir={data_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert "error: dataset root" in missing.stderr and "does not exist" in missing.stderr
