"""Training curves as a picture: ``WORKDIR/curves.png`` beside ``metrics.jsonl``.

Three panels over the training step (the loss and its terms, the learning rate, the held-out
mIoU in percent), drawn with Pillow alone, so no plotting library is needed. Training
redraws it after every evaluation and at the end (:func:`write_curves`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mcibi_jax.train.writers import read_records

CURVES = "curves.png"
WIDTH, PANEL_HEIGHT = 720, 210
MARGIN = {"left": 70, "right": 150, "top": 26, "bottom": 30}
COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)
Series = tuple[str, Sequence[float], Sequence[float]]  # (name, steps, values)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:  # one value: a small range around it
        half = 0.05 * abs(low) or 0.5
        low, high = low - half, high + half
    raw = (high - low) / max(count - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step + 1e-9)) + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.4g}"


def _font(size: int):

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def _panel(
    draw: Any, top: int, title: str, series: Sequence[Series], last_step: float, empty: str
) -> None:
    """One panel: axes with round ticks, each series as a line (dots where it has few points)."""
    font = _font(12)
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    y0, y1 = top + MARGIN["top"], top + PANEL_HEIGHT - MARGIN["bottom"]
    draw.text((left, top + 6), title, fill=(0, 0, 0), font=_font(14))
    draw.rectangle((left, y0, right, y1), outline=(120, 120, 120))
    values = (
        np.concatenate([np.asarray(v, np.float64) for _, _, v in series]) if series else np.zeros(0)
    )
    values = values[np.isfinite(values)]
    if values.size == 0:
        draw.text(
            ((left + right) // 2 - 60, (y0 + y1) // 2 - 6), empty, fill=(110, 110, 110), font=font
        )
        return
    ticks = nice_ticks(float(values.min()), float(values.max()))
    low, high = ticks[0], ticks[-1]
    x_ticks = nice_ticks(0.0, float(max(last_step, 1)), 6)
    x_high = x_ticks[-1]

    def x(step: float) -> float:
        return left + (right - left) * step / x_high

    def y(value: float) -> float:
        return y1 - (y1 - y0) * (value - low) / (high - low)

    for tick in ticks:
        draw.line((left, y(tick), right, y(tick)), fill=(232, 232, 232))
        draw.text((left - 6, y(tick)), _label(tick), fill=(60, 60, 60), font=font, anchor="rm")
    for tick in x_ticks:
        draw.line((x(tick), y1, x(tick), y1 + 4), fill=(120, 120, 120))
        draw.text((x(tick), y1 + 6), _label(tick), fill=(60, 60, 60), font=font, anchor="ma")
    for index, (name, steps, series_values) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = [
            (x(s), y(v)) for s, v in zip(steps, series_values) if v is not None and math.isfinite(v)
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2 if index == 0 else 1)
        if len(points) <= 20:
            for px, py in points:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        legend_y = y0 + 4 + 16 * index
        draw.line((right + 10, legend_y + 6, right + 28, legend_y + 6), fill=colour, width=2)
        draw.text((right + 34, legend_y), name, fill=(0, 0, 0), font=font)


def draw_curves(records: Sequence[Mapping[str, Any]]) -> Any:
    """A PIL image of the curves of metrics.jsonl ``records`` (training lines carry ``loss*``
    and ``lr``; evaluation lines ``eval/mIoU``)."""

    train = [r for r in records if r.get("loss") is not None and "step" in r]
    evaluations = [r for r in records if r.get("eval/mIoU") is not None and "step" in r]
    last_step = max([r["step"] for r in train + evaluations] or [1])
    loss_keys = ["loss"] + sorted({k for r in train for k in r if k.startswith("loss_")})

    def series(rows: Sequence[Mapping[str, Any]], key: str, name: str | None = None) -> Series:
        kept = [r for r in rows if r.get(key) is not None]
        return name or key, [r["step"] for r in kept], [float(r[key]) for r in kept]

    image = Image.new("RGB", (WIDTH, 3 * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    _panel(
        draw,
        0,
        "training loss (mean since the previous line)",
        [series(train, k) for k in loss_keys if any(r.get(k) is not None for r in train)],
        last_step,
        "no training steps yet",
    )
    _panel(
        draw,
        PANEL_HEIGHT,
        "learning rate",
        [series(train, "lr")] if train else [],
        last_step,
        "no training steps yet",
    )
    best = max((r["eval/mIoU"] for r in evaluations), default=None)
    title = "held-out mIoU (%)" + (f", best {best:.2f}" if best is not None else "")
    _panel(
        draw,
        2 * PANEL_HEIGHT,
        title,
        [series(evaluations, "eval/mIoU", "mIoU")] if evaluations else [],
        last_step,
        "no evaluation yet",
    )
    return image


def write_curves(
    workdir: str | os.PathLike, records: Sequence[Mapping[str, Any]] | None = None
) -> Path:
    """Draws ``WORKDIR/curves.png`` from ``records`` (default: WORKDIR/metrics.jsonl), through a
    temporary file so a reader never sees half a picture."""
    workdir = Path(workdir)
    image = draw_curves(read_records(workdir) if records is None else records)
    path = workdir / CURVES
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG", optimize=True)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
