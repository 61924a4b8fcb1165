"""Draws docs/demo_predictions.png: held-out demo images, their ground truth and the trained
demo model's prediction, one image per row.

    python docs/make_demo_figure.py [--workdir=/tmp/mcibi_demo] [--out=docs/demo_predictions.png] [--num=4]

Uses the demo trained in ``--workdir`` (its best checkpoint, else its newest); trains it there
first (``python -m mcibi_jax.main --config=configs/demo.py``) when the folder holds none.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CELL = 128  # pixels per image in the figure (the demo's 64x64, enlarged without smoothing)
HEADER = 24
IGNORED = (255, 255, 255)  # ground-truth pixels without a label (shape boundaries)


def demo_images(config, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` held-out demo images as uint8 RGB (N, H, W, 3) and their labels (N, H, W)."""
    from mcibi_jax.data import synthetic

    test = config.dataset.test
    images, labels = synthetic.make_split(
        int(test.seed), num, tuple(config.dataset.image_size), int(config.dataset.num_classes)
    )
    rgb = np.clip(np.rint((images * synthetic.STD + synthetic.MEAN) * 255), 0, 255).astype(np.uint8)
    return rgb, labels


def figure(
    images: np.ndarray,
    truths: np.ndarray,
    predictions: np.ndarray,
    palette: np.ndarray,
    names: list[str],
    accuracy: list[float],
):
    """A PIL image: columns image | ground truth | prediction, one row per image, a legend below."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    num = len(images)
    legend = 26
    canvas = Image.new("RGB", (3 * CELL + 4 * 6, HEADER + num * (CELL + 6) + legend), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(("image", "ground truth", "prediction")):
        draw.text(
            (6 + column * (CELL + 6) + CELL // 2, 4), title, fill=(0, 0, 0), font=font, anchor="ma"
        )
    for row in range(num):
        truth = palette[np.clip(truths[row], 0, len(palette) - 1)]
        truth[truths[row] < 0] = IGNORED
        cells = (images[row], truth, palette[predictions[row]])
        top = HEADER + row * (CELL + 6)
        for column, cell in enumerate(cells):
            tile = Image.fromarray(cell).resize((CELL, CELL), Image.NEAREST)
            canvas.paste(tile, (6 + column * (CELL + 6), top))
        draw.text(
            (6 + 2 * (CELL + 6) + CELL - 4, top + CELL - 4),
            f"{100 * accuracy[row]:.0f} %",
            fill=(255, 255, 255),
            font=font,
            anchor="rd",
            stroke_width=2,
            stroke_fill=(0, 0, 0),
        )
    x, y = 6, canvas.height - legend + 6
    for colour, name in zip(palette, names):
        draw.rectangle(
            (x, y, x + 12, y + 12), fill=tuple(int(c) for c in colour), outline=(0, 0, 0)
        )
        draw.text((x + 16, y - 1), name, fill=(0, 0, 0), font=font)
        x += 24 + int(draw.textlength(name, font=font))
    return canvas


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from mcibi_jax import load_config
    from mcibi_jax.data.classes import class_names, dataset_palette
    from mcibi_jax.predict import load_segmenter
    from mcibi_jax.train.experiment import run

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="/tmp/mcibi_demo", help="the demo's training folder")
    parser.add_argument("--out", default=str(REPO / "docs" / "demo_predictions.png"))
    parser.add_argument("--num", type=int, default=4, help="images (rows)")
    args = parser.parse_args(argv)

    config = load_config(REPO / "configs" / "demo.py")
    workdir = Path(args.workdir)
    if not (workdir / "checkpoints").is_dir():
        print(
            f"no trained demo in {workdir}: training it (python -m mcibi_jax.main --config=configs/demo.py)"
        )
        run(config, workdir, "train_and_eval")
    segmenter = load_segmenter(config, checkpoint=workdir)
    images, truths = demo_images(config, args.num)
    predictions = np.stack([segmenter.predict(image) for image in images])
    labelled = truths >= 0
    accuracy = [float((p == t)[m].mean()) for p, t, m in zip(predictions, truths, labelled)]
    num_classes = int(config.model.num_classes)
    picture = figure(
        images,
        truths,
        predictions,
        dataset_palette(config.dataset, num_classes),
        class_names(config.dataset, num_classes),
        accuracy,
    )
    picture.save(args.out, format="PNG", optimize=True)
    print(
        f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB); pixel accuracy per image: "
        + ", ".join(f"{100 * a:.1f} %" for a in accuracy)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
