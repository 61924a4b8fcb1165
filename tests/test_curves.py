"""WORKDIR/curves.png: the training curves drawn with Pillow."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from mcibi_jax.train import curves


def _records() -> list[dict]:
    lines = [{"hparams": {"train.lr": 0.02}}]
    for step in range(32, 321, 32):
        lines.append(
            {
                "step": step,
                "loss": 2.0 / (1 + step / 64),
                "loss_memory": 0.1 if step > 128 else 0.0,
                "lr": 0.02 * (1 - step / 330) ** 0.9,
                "epoch": 1 + step // 128,
            }
        )
        if step % 128 == 0:
            lines.append({"step": step, "eval/mIoU": 40.0 + step / 10, "eval/aAcc": 90.0})
    return lines


def _panel(image: Image.Image, index: int) -> np.ndarray:
    array = np.asarray(image)
    return array[
        index * curves.PANEL_HEIGHT + curves.MARGIN["top"] + 1 : (index + 1) * curves.PANEL_HEIGHT
        - curves.MARGIN["bottom"],
        curves.MARGIN["left"] + 1 : curves.WIDTH - curves.MARGIN["right"],
    ]


def test_curves_show_loss_lr_and_miou(tmp_path):
    # cut line
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _records()) + '{"step": 3'
    )
    path = curves.write_curves(tmp_path)
    assert path == tmp_path / "curves.png" and not list(tmp_path.glob(".*tmp"))
    image = Image.open(path)
    assert image.size == (curves.WIDTH, 3 * curves.PANEL_HEIGHT) and image.mode == "RGB"
    for index in range(3):  # each panel draws its first series in the first colour
        assert (_panel(image, index) == curves.COLOURS[0]).all(-1).sum() > 50, index
    assert (_panel(image, 0) == curves.COLOURS[1]).all(-1).sum() > 20  # the loss term


def test_curves_before_any_evaluation_and_ticks():
    image = curves.draw_curves([r for r in _records() if "eval/mIoU" not in r])
    assert (_panel(image, 1) == curves.COLOURS[0]).all(-1).sum() > 50
    assert not (_panel(image, 2) == curves.COLOURS[0]).all(-1).any()  # "no evaluation yet"
    assert curves.draw_curves([]).size == (curves.WIDTH, 3 * curves.PANEL_HEIGHT)
    assert curves.nice_ticks(0.013, 1.91) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert curves.nice_ticks(0, 1280, 6) == [0.0, 500.0, 1000.0, 1500.0]
    ticks = curves.nice_ticks(81.2, 81.2)
    assert ticks[0] < 81.2 < ticks[-1]
