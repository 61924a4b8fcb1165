"""``python -m mcibi_jax.export``: the served function, run from its files in a fresh process
that never imports the model code, gives the masks of ``Segmenter.predict``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import mcibi_jax
from mcibi_jax import export
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.porting.variables import abstract_variables, save_variables

pytest.importorskip(
    "flatbuffers", reason=f"jax.export serialization needs flatbuffers: {export.INSTALL}"
)

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.py"
SIZE = (40, 56)
# sliding windows over two scales with flip: the most the export has to carry
SLIDE_TTA = [
    "model.inference.mode='slide'",
    "model.inference.cropsize=[32, 32]",
    "model.inference.stride=[20, 20]",
    "model.inference.multiscale=[0.75, 1.0]",
    "model.inference.flip=True",
    "model.inference.use_probs_before_resize=True",
]

LOADER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    images = np.load(sys.argv[1])
    for directory in sys.argv[2:]:
        spec = json.load(open(f"{directory}/model.json"))
        exported = jax.export.deserialize(bytearray(open(f"{directory}/" + spec["function"], "rb").read()))
        result = exported.call(images)
        np.savez(f"{directory}/result.npz", **{k: np.asarray(v) for k, v in result.items()})
    assert not any(name.startswith("mcibi_jax") for name in sys.modules), "the loader imported mcibi_jax"
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights of the demo model (positive variances)."""
    config = mcibi_jax.load_config(DEMO)
    rng = np.random.default_rng(5)
    shapes = abstract_variables(build_model(config["model"]), config["model"])
    variables = {
        collection: jax.tree_util.tree_map(
            lambda leaf, collection=collection: (
                0.5 + rng.random(leaf.shape)
                if collection == "batch_stats"
                else 0.3 * rng.standard_normal(leaf.shape)
            ).astype(np.float32),
            dict(tree),
        )
        for collection, tree in shapes.items()
    }
    return save_variables(tmp_path_factory.mktemp("ckpt") / "demo", variables)


def _images(count: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (count, *SIZE, 3), dtype=np.uint8)


QUOTE = "'"  # on the command line a string value goes without quotes (config_flags)
VARIANTS = {"whole": [], "slide_tta": SLIDE_TTA, "test_resize": []}
# the demo model behind a released-style test pipeline: resize to fit (72, 54), keep the ratio
RESIZING_DATASET = {
    "name": "cityscapes",
    "num_classes": 4,
    "ignore_label": -100,
    "mean": (123.675, 116.28, 103.53),
    "std": (58.395, 57.12, 57.375),
    "train": {"flip_label_pairs": ()},
    "test": {"output_size": (72, 54), "keep_ratio": True},
}


def _config(variant: str):
    config = mcibi_jax.load_config(DEMO, VARIANTS[variant])
    if variant == "test_resize":
        config.dataset = RESIZING_DATASET
    return config


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """{variant: (export directory, the loader's outputs)}: all exports run by one fresh process."""
    root = tmp_path_factory.mktemp("served")
    args = [f"--config={DEMO}", f"--checkpoint={checkpoint}", f"--size={SIZE[0]}x{SIZE[1]}"]
    for name in ("whole", "slide_tta"):  # through the command line
        assert (
            export.main(
                args
                + [f"--out={root / name}"]
                + [f"--config.{o.replace(QUOTE, '')}" for o in VARIANTS[name]]
            )
            == 0
        )
    segmenter = mcibi_jax.Segmenter.from_checkpoint(checkpoint, _config("test_resize"))
    exported, description = export.export_segmenter(segmenter, SIZE)
    assert description["test_resize"] == [51, 72]  # 40x56 scaled to fit 72 x 54
    export.save(root / "test_resize", exported, description)
    np.save(root / "images.npy", _images(3))
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOADER,
            str(root / "images.npy"),
            *(str(root / n) for n in VARIANTS),
        ],
        check=True,
        cwd=root,
        timeout=600,
    )
    return {name: (root / name, dict(np.load(root / name / "result.npz"))) for name in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_function_gives_the_masks_of_predict(checkpoint, served, variant):
    directory, result = served[variant]
    spec = json.loads((directory / "model.json").read_text())
    assert spec["input"]["shape"] == ["batch", *SIZE, 3] and spec["symbolic_dims"] == ["batch"]
    assert spec["classes"][0] and len(spec["palette"]) == spec["num_classes"] == 4

    images = _images(3)  # any batch size runs: the batch is symbolic
    segmenter = mcibi_jax.Segmenter.from_checkpoint(checkpoint, _config(variant))
    expected = np.stack([segmenter.predict(image) for image in images])
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(result["labels"], expected)
    assert result["probabilities"].shape == (3, *SIZE, 4)
    np.testing.assert_allclose(result["probabilities"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result["probabilities"].argmax(-1), expected)


def test_export_errors_are_one_line(checkpoint, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep").write_text("mine")
    base = [f"--config={DEMO}", f"--checkpoint={checkpoint}"]
    assert export.main(base + [f"--out={taken}"]) == 2
    assert "not empty" in capsys.readouterr().err and (taken / "keep").read_text() == "mine"
    assert export.main(base + [f"--out={tmp_path / 'a'}", "--size=40by56"]) == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
    assert (
        export.main(
            [f"--config={DEMO}", f"--checkpoint={tmp_path / 'none'}", f"--out={tmp_path / 'b'}"]
        )
        == 2
    )
    assert "no checkpoint" in capsys.readouterr().err


def test_the_test_resize_is_opencvs_bit_for_bit():
    import cv2
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    for (h, w), (out_h, out_w) in [
        ((30, 40), (51, 68)),
        ((64, 96), (32, 48)),
        ((57, 91), (40, 33)),
        ((5, 7), (3, 2)),
    ]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = np.asarray(export._resize_uint8(jnp.asarray(image[None]), (out_h, out_w))[0])
        np.testing.assert_array_equal(
            ours, cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        )
