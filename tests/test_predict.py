"""``Segmenter.predict`` and ``python -m mcibi_jax.predict`` on the small fixture model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

import mcibi_jax
from mcibi_jax import predict
from mcibi_jax.data import classes
from mcibi_jax.evaluation.tta import tta_scores
from mcibi_jax.porting.variables import save_variables, variables_from_pth
from tests.reference_data import FIXTURES

CASE = "resnet50_cityscapes"  # 5 classes
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
SIZES = {"tall": (41, 29), "wide": (37, 53)}  # (H, W)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """A config file: the fixture model (whole-image inference for speed) with a
    Cityscapes-like test pipeline and two-scale + flip TTA settings."""
    path = tmp_path_factory.mktemp("config") / "predict_config.py"
    path.write_text(
        "import json\n"
        "import ml_collections\n"
        "from mcibi_jax.reference_config import model_config_from_reference\n\n"
        "def get_config():\n"
        f"    meta = json.load(open({str(FIXTURES / CASE)!r} + '.json'))\n"
        "    model = model_config_from_reference(meta['reference_config'])\n"
        "    model.inference = {'mode': 'whole', 'cropsize': [], 'stride': [], 'multiscale': [1.0], 'flip': False,\n"
        "                       'use_probs_before_resize': False}\n"
        "    dataset = {'name': 'cityscapes', 'num_classes': 5, 'ignore_label': -100,\n"
        f"               'mean': {MEAN!r}, 'std': {STD!r},\n"
        "               'train': {'flip_label_pairs': ((1, 3),)},\n"
        "               'test': {'output_size': (96, 48), 'keep_ratio': True}}\n"
        "    evaluation = {'use_tta': False, 'tta_mode': 'whole', 'tta_multiscale': [0.75, 1.0], 'tta_flip': True,\n"
        "                  'tta_use_probs_before_resize': True}\n"
        "    return ml_collections.ConfigDict({'model': model, 'dataset': dataset, 'eval': evaluation})\n"
    )
    return path


@pytest.fixture(scope="module")
def config(config_file):
    return mcibi_jax.load_config(config_file)


@pytest.fixture(scope="module")
def checkpoint(config, tmp_path_factory):
    return save_variables(
        tmp_path_factory.mktemp("ckpt") / "r50",
        variables_from_pth(FIXTURES / f"{CASE}.pth", config),
    )


@pytest.fixture(scope="module")
def segmenter(config):
    return mcibi_jax.Segmenter.from_pth(FIXTURES / f"{CASE}.pth", config)


def _image(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth colour blobs plus noise, so that the predictions are not all one class."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    big = cv2.resize(small, shape[::-1], interpolation=cv2.INTER_LINEAR).astype(np.int16)
    return np.clip(big + rng.integers(-20, 21, big.shape), 0, 255).astype(np.uint8)


@pytest.fixture()
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(_image(SIZES["tall"], 0)).save(folder / "tall.png")
    Image.fromarray(_image(SIZES["wide"], 1)).save(folder / "wide.bmp")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_equals_the_argmax_of_tta_scores_at_the_original_size(segmenter, config):
    image = _image(SIZES["wide"], 2)
    # by hand: keep-ratio resize for (96, 48) -> factor min(96 / 53, 48 / 37) -> (48, 69), normalise
    resized = cv2.resize(image, (69, 48), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    normalised = ((resized - np.array(MEAN)) / np.array(STD)).astype(np.float32)
    settings = {
        "mode": "whole",
        "multiscale": [0.75, 1.0],
        "flip": True,
        "use_probs_before_resize": True,
    }
    scores = tta_scores(
        segmenter.model,
        segmenter.variables,
        normalised[None],
        settings,
        flip_label_pairs=[(1, 3)],
        output_size=SIZES["wide"],
    )
    want = np.asarray(scores[0]).argmax(-1)

    got = segmenter.predict(image, use_tta=True)
    assert got.shape == SIZES["wide"] and got.dtype == np.int32
    assert (got == want).mean() >= 0.999  # exact here; the hand normalisation may differ by 1 ulp
    assert len(np.unique(got)) > 1

    tta_config = config.copy_and_resolve_references()
    tta_config.eval.use_tta = True  # the config's switch picks the same settings
    np.testing.assert_array_equal(
        mcibi_jax.Segmenter.from_config(tta_config, segmenter.variables).predict(image), got
    )


def test_predict_rejects_what_is_not_a_uint8_rgb_image(segmenter):
    image = _image((8, 8), 3)
    with pytest.raises(ValueError, match="uint8"):
        segmenter.predict(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*grey"):
        segmenter.predict(image[..., 0])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        segmenter.predict(np.concatenate([image, image[..., :1]], -1))
    model_only = mcibi_jax.Segmenter(
        segmenter.model, segmenter.variables, segmenter.config["model"]
    )
    with pytest.raises(ValueError, match="dataset"):
        model_only.predict(image)


def test_cli_writes_mask_labels_and_overlay_and_skips_what_exists(
    config_file, checkpoint, segmenter, image_dir, tmp_path, capsys
):
    out = tmp_path / "out" / "nested"
    args = [
        f"--config={config_file}",
        f"--checkpoint={checkpoint}",
        f"--input={image_dir}",
        f"--output={out}",
    ]
    assert predict.main(args + ["--overlay_alpha=0.4"]) == 1  # 1: the broken file
    captured = capsys.readouterr()
    assert "[2/3]" in captured.out and "tall.png" in captured.out and " s" in captured.out
    assert "broken.jpg" in captured.err and "unreadable" in captured.err
    assert "2 segmented" in captured.out and "1 failed" in captured.out

    palette = classes.dataset_palette({"name": "cityscapes"}, 5)
    for name, (h, w) in SIZES.items():
        source = np.asarray(Image.open(image_dir / f"{name}{'.png' if name == 'tall' else '.bmp'}"))
        labels = np.asarray(Image.open(out / f"{name}_labels.png"))
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        overlay = Image.open(out / f"{name}_overlay.jpg")
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < 5
        assert mask.shape == (h, w, 3)
        np.testing.assert_array_equal(mask, palette[labels])
        assert overlay.size == (w, h) and overlay.format == "JPEG"
        np.testing.assert_array_equal(labels, segmenter.predict(source))
        blended = predict.blend(source, mask, 0.4).astype(int)
        assert np.abs(np.asarray(overlay, int) - blended).mean() < 8  # JPEG
    assert not list(out.glob("broken*")) and not list(out.glob(".*"))

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "wide_overlay.jpg").unlink()
    assert predict.main(args) == 1
    captured = capsys.readouterr().out
    assert "tall.png ... skipped" in captured and "1 segmented, 1 skipped" in captured
    assert "kept existing wide_mask.png, wide_labels.png" in captured
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if k != "wide_overlay.jpg")


def _exit_status(main, argv: list[str]) -> int:
    """What ``main`` returns, or the status of its SystemExit (a command-line mistake)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_cli_one_line_errors(config_file, image_dir, tmp_path, capsys):
    pth = FIXTURES / f"{CASE}.pth"
    base = [f"--config={config_file}", f"--output={tmp_path / 'out'}"]
    cases = {
        "no checkpoint at": base + [f"--checkpoint={tmp_path / 'missing'}", f"--input={image_dir}"],
        "holds no checkpoint of variables": base
        + [f"--checkpoint={image_dir}", f"--input={image_dir}"],
        "no images": base + [f"--pth={pth}", f"--input={tmp_path / 'out'}"],
        "does not exist": base + [f"--pth={pth}", f"--input={tmp_path / 'nowhere'}"],
        "unknown config key": base
        + [f"--pth={pth}", f"--input={image_dir}", "--config.model.nope=1"],
        "overlay_alpha": base + [f"--pth={pth}", f"--input={image_dir}", "--overlay_alpha=2"],
        "overlay_background": base
        + [f"--pth={pth}", f"--input={image_dir}", "--overlay_background=5"],
    }
    (tmp_path / "out").mkdir()
    for message, args in cases.items():
        assert _exit_status(predict.main, args) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
    assert (
        _exit_status(
            predict.main,
            [
                f"--config={tmp_path / 'nope.py'}",
                f"--pth={pth}",
                f"--input={image_dir}",
                f"--output={tmp_path}",
            ],
        )
        == 2
    )
    assert "nope.py" in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir())


def test_overlay_leaves_the_background_class_unpainted(
    config_file, checkpoint, segmenter, image_dir, tmp_path
):
    source = np.asarray(Image.open(image_dir / "wide.bmp"))
    labels = segmenter.predict(source)
    # the fixture model has no background: pick one
    common = int(np.bincount(labels.ravel()).argmax())
    (image_dir / "tall.png").unlink()
    (image_dir / "broken.jpg").unlink()
    args = [
        f"--config={config_file}",
        f"--checkpoint={checkpoint}",
        f"--input={image_dir}",
        "--overlay_alpha=0.8",
    ]
    assert (
        predict.main(args + [f"--output={tmp_path / 'a'}", f"--overlay_background={common}"]) == 0
    )
    # auto: Cityscapes has no background
    assert predict.main(args + [f"--output={tmp_path / 'b'}"]) == 0
    kept = np.asarray(Image.open(tmp_path / "a" / "wide_overlay.jpg"), int)
    painted = np.asarray(Image.open(tmp_path / "b" / "wide_overlay.jpg"), int)
    background = labels == common
    assert background.any()
    assert np.abs(kept - source)[background].mean() < 12  # the photo itself (JPEG of a noisy image)
    assert np.abs(painted - source)[background].mean() > 20
    mask = classes.dataset_palette({"name": "cityscapes"}, 5)[labels]
    assert np.abs(kept - predict.blend(source, mask, 0.8, background)).mean() < 12


def test_background_class_per_dataset():
    from mcibi_jax.data.datasets import SPECS

    for name in (
        "cityscapes",
        "ade20k",
        "cocostuff10k",
    ):  # no background class: unlabelled pixels are ignored
        assert classes.background_class({"name": name}, SPECS[name].num_classes) is None
    assert classes.background_class({"name": "lip"}, 20) == 0
    assert classes.background_class({"name": "synthetic"}, 4) == 0
    assert classes.class_names({"name": "synthetic"}, 3) == ["background", "shape1", "shape2"]
    assert classes.class_names({"name": "cityscapes"}, 21)[-2:] == ["class 19", "class 20"]
    assert classes.class_names(None, 2) == ["class 0", "class 1"]
    assert predict.overlay_background("auto", {"name": "lip"}, 20) == 0
    assert predict.overlay_background("none", {"name": "lip"}, 20) is None
    assert predict.overlay_background("3", {"name": "ade20k"}, 150) == 3
    for bad in ("150", "-1", "sky"):
        with pytest.raises(predict.ConfigError, match="overlay_background"):
            predict.overlay_background(bad, {"name": "ade20k"}, 150)
    image = np.full((2, 3, 3), 200, np.uint8)
    labels = np.array([[0, 1, 0], [1, 1, 0]])
    palette = np.array([[0, 0, 0], [0, 0, 255]], np.uint8)
    painted = predict.overlay(image, labels, palette, 0.5, background=0)
    np.testing.assert_array_equal(painted[labels == 0], image[labels == 0])  # not dimmed
    np.testing.assert_array_equal(painted[labels == 1], [[100, 100, 228]] * 3)
    np.testing.assert_array_equal(
        predict.overlay(image, labels, palette, 0.5)[0, 0], [100, 100, 100]
    )


def test_palettes_and_16_bit_labels(tmp_path):
    from mcibi_jax.data.datasets import SPECS

    generated = classes.generated_palette(300)
    assert generated.dtype == np.uint8 and tuple(generated[0]) == (0, 0, 0)
    assert len({tuple(c) for c in generated}) == 300
    np.testing.assert_array_equal(classes.generated_palette(300), generated)
    for name in ("cityscapes", "ade20k", "cocostuff10k", "lip"):
        k = len(SPECS[name].palette)
        np.testing.assert_array_equal(
            classes.dataset_palette({"name": name}, k), np.asarray(SPECS[name].palette, np.uint8)
        )
    np.testing.assert_array_equal(classes.dataset_palette({"name": "synthetic"}, 4), generated[:4])

    labels = (np.arange(12 * 7).reshape(12, 7) * 3) % 300
    predict.write_label_png(tmp_path / "l.png", labels, 300)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "l.png")), labels)
    predict.write_label_png(tmp_path / "s.png", labels % 256, 256)
    assert Image.open(tmp_path / "s.png").mode == "L"


def test_finding_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "a.png", "a.jpeg", "sub/c.bmp", "x.gif", "a_mask.png"):
        Image.new("RGB", (4, 3)).save(tmp_path / name, format="PNG")
    root, flat = predict.find_images(tmp_path, exclude=tmp_path)
    assert root == tmp_path and [p.name for p in flat] == ["a.jpeg", "a.png", "b.JPG"]
    _, deep = predict.find_images(tmp_path, recursive=True, exclude=tmp_path / "elsewhere")
    assert [p.relative_to(tmp_path).as_posix() for p in deep] == [
        "a.jpeg",
        "a.png",
        "a_mask.png",
        "b.JPG",
        "sub/c.bmp",
    ]
    stems = predict.output_stems(deep, tmp_path)
    assert [s.as_posix() for s in stems] == ["a_jpeg", "a_png", "a_mask", "b", "sub/c"]
    assert predict.find_images(tmp_path / "a.png") == (tmp_path, [tmp_path / "a.png"])


def test_a_training_workdir_means_its_best_else_its_newest_checkpoint(tmp_path):
    from mcibi_jax.predict import workdir_checkpoint

    final = tmp_path / "checkpoints" / "final"
    final.mkdir(parents=True)
    (final / "_METADATA").write_text("{}")
    assert workdir_checkpoint(final) == final
    assert workdir_checkpoint(tmp_path) == final
    best = tmp_path / "checkpoints" / "best"
    best.mkdir()
    (best / "_METADATA").write_text("{}")
    assert workdir_checkpoint(tmp_path) == best
    # reported later as missing
    assert workdir_checkpoint(tmp_path / "elsewhere") == tmp_path / "elsewhere"
