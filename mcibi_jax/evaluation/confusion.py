"""The confusion matrix of an evaluation (``inference.confusion_counts``) saved as CSV (counts,
with class names) and as a row-normalised PNG heat map (Pillow only)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def row_normalised(counts: Any) -> np.ndarray:
    """Each row divided by its sum (the share of a ground-truth class predicted as each class);
    rows of classes absent from the ground truth stay 0."""
    counts = np.asarray(counts, np.float64)
    sums = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)


def write_csv(path: str | os.PathLike, counts: Any, class_names: Sequence[str]) -> Path:
    """A (K + 1) x (K + 1) table: header row of predicted classes, one row per ground-truth class."""
    counts = np.asarray(counts)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(
            f"confusion matrix {counts.shape} does not fit {len(class_names)} class names"
        )
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["ground truth \\ prediction", *class_names])
        for name, row in zip(class_names, counts):
            writer.writerow([name, *(int(v) for v in row)])
    return path


def read_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(class names, (K, K) int64 counts) of a file written by :func:`write_csv`."""
    with Path(path).open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    names = rows[0][1:]
    return names, np.array([[int(v) for v in row[1:]] for row in rows[1:]], np.int64).reshape(
        len(names), len(names)
    )


def _colour(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, white through blue to dark blue."""
    stops = np.array([[255, 255, 255], [107, 174, 214], [8, 48, 107]], np.float64)
    x = np.clip(values, 0.0, 1.0) * (len(stops) - 1)
    low = np.minimum(np.floor(x).astype(int), len(stops) - 2)
    t = (x - low)[..., None]
    return np.round(stops[low] * (1 - t) + stops[low + 1] * t).astype(np.uint8)


def heatmap_image(counts: Any, class_names: Sequence[str] | None = None, cell: int | None = None):
    """A PIL image of the row-normalised matrix: one square per (ground truth, prediction) pair,
    darker = larger share; the class names label the rows and columns when there is room."""

    shares = row_normalised(counts)
    k = shares.shape[0]
    cell = cell or max(4, min(40, 1200 // max(k, 1)))
    labelled = class_names is not None and cell >= 10
    margin = 0
    if labelled:
        font = ImageFont.load_default()
        margin = 8 + max(
            int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(str(n), font=font))
            for n in class_names
        )
    grid = np.repeat(np.repeat(_colour(shares), cell, axis=0), cell, axis=1)
    image = Image.new("RGB", (margin + k * cell, margin + k * cell), "white")
    image.paste(Image.fromarray(grid), (margin, margin))
    if labelled:
        draw = ImageDraw.Draw(image)
        for i, name in enumerate(class_names):
            draw.text((2, margin + i * cell + cell // 2 - 5), str(name), fill="black", font=font)
        columns = Image.new("RGB", (margin, k * cell), "white")
        column_draw = ImageDraw.Draw(columns)
        for i, name in enumerate(class_names):
            column_draw.text((2, i * cell + cell // 2 - 5), str(name), fill="black", font=font)
        image.paste(columns.rotate(90, expand=True), (margin, 0))
        if cell >= 24:  # the share in percent inside each square
            for i in range(k):
                for j in range(k):
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    draw.text(
                        (margin + j * cell + 2, margin + i * cell + cell // 2 - 5),
                        f"{100 * shares[i, j]:.0f}",
                        fill=colour,
                        font=font,
                    )
    return image


def save_confusion(
    directory: str | os.PathLike, counts: Any, class_names: Sequence[str]
) -> tuple[Path, Path]:
    """Writes ``directory``/confusion.csv and confusion.png; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(directory / "confusion.csv", counts, class_names)
    png_path = directory / "confusion.png"
    heatmap_image(counts, class_names).save(png_path)
    return csv_path, png_path
