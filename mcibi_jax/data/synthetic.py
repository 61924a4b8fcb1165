"""Generated segmentation scenes: textured shapes on a textured background (numpy only).

Class 0 is the background; every other class is drawn as ellipses, rectangles and
triangles. Each class has its own colour and its own stripe texture (frequency and
orientation), and every scene adds a random brightness shift, a random phase per shape and
pixel noise, so that colour alone is not quite enough: a small network learns it, but not
in a handful of steps. The class statistics are fixed; only the scene layout depends on the
seed, so splits made with different seeds are independent samples of the same task.
Pixels on shape boundaries are sometimes labelled ``IGNORE_LABEL``.
"""

from __future__ import annotations

import numpy as np

IGNORE_LABEL = -100
MEAN, STD = 0.5, 0.25  # the images are (rgb - MEAN) / STD, rgb roughly in [0, 1]

_STYLE_SEED = 20240613  # fixes the per-class colours and textures


def class_names(num_classes: int) -> list[str]:
    return ["background"] + [f"shape{k}" for k in range(1, num_classes)]


def class_styles(num_classes: int) -> dict[str, np.ndarray]:
    """Colour (K, 3), stripe frequency (K,), orientation (K,), amplitude (K,) of each class."""
    rng = np.random.default_rng(_STYLE_SEED + num_classes)
    colours = rng.uniform(0.25, 0.75, size=(num_classes, 3))
    frequency = rng.uniform(0.15, 0.9, size=num_classes)  # radians per pixel
    orientation = rng.uniform(0.0, np.pi, size=num_classes)
    amplitude = rng.uniform(0.08, 0.2, size=num_classes)
    return {"colour": colours, "frequency": frequency, "orientation": orientation, "amplitude": amplitude}


def _texture(style: dict[str, np.ndarray], k: int, yy: np.ndarray, xx: np.ndarray, phase: float) -> np.ndarray:
    """(H, W, 3) colour of class ``k`` everywhere."""
    theta = style["orientation"][k]
    wave = np.sin(style["frequency"][k] * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    return style["colour"][k] + style["amplitude"][k] * wave[..., None] * np.array([1.0, -0.5, 0.75])


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
    if kind == 0:  # ellipse
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if kind == 1:  # rectangle, rotated
        angle = rng.uniform(0, np.pi)
        u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
        v = -np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)
        return (np.abs(u) <= rx) & (np.abs(v) <= ry)
    # triangle: inside three half-planes around the centre
    angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.0, 4.0]) * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
    radius = max(ry, rx)
    corners = np.stack([cy + radius * np.sin(angles), cx + radius * np.cos(angles)], axis=1)
    inside = np.ones(yy.shape, bool)
    for i in range(3):
        (ay, ax), (by, bx) = corners[i], corners[(i + 1) % 3]
        (oy, ox) = corners[(i + 2) % 3]
        side = lambda py, px: (bx - ax) * (py - ay) - (by - ay) * (px - ax)  # noqa: E731
        inside &= np.sign(side(yy, xx)) == np.sign(side(oy, ox))
    return inside


def make_scene(
    rng: np.random.Generator, size: tuple[int, int], num_classes: int, style: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: rgb float32 (H, W, 3) roughly in [0, 1] and labels int32 (H, W)."""
    style = style if style is not None else class_styles(num_classes)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    image = _texture(style, 0, yy, xx, rng.uniform(0, 2 * np.pi))
    labels = np.zeros((h, w), np.int32)
    for _ in range(rng.integers(2, 6)):
        k = int(rng.integers(1, num_classes))
        mask = _shape_mask(int(rng.integers(0, 3)), yy, xx, rng, size)
        image[mask] = _texture(style, k, yy, xx, rng.uniform(0, 2 * np.pi))[mask]
        labels[mask] = k
    image = image + rng.normal(0.0, 0.06, size=3)  # colour cast of the scene
    image = image + rng.normal(0.0, 0.12, size=image.shape)  # pixel noise
    # Some boundary pixels are left unlabelled, like annotation borders in real data.
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    labels[edge & (rng.uniform(size=(h, w)) < 0.5)] = IGNORE_LABEL
    return image.astype(np.float32), labels


def make_split(seed: int, n: int, size: tuple[int, int] | int, num_classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes: normalised images float32 (n, H, W, 3) and labels int32 (n, H, W).

    Deterministic in ``seed``; labels are in [0, num_classes) or ``IGNORE_LABEL``.
    """
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2 (background and one shape class)")
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    style = class_styles(num_classes)
    rng = np.random.default_rng(seed)
    images = np.empty((n, *size, 3), np.float32)
    labels = np.empty((n, *size), np.int32)
    for i in range(n):
        image, label = make_scene(rng, size, num_classes, style)
        images[i] = (image - MEAN) / STD
        labels[i] = label
    return images, labels


def batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int, epoch: int, flip_prob: float = 0.0
):
    """Shuffled full batches of one epoch (the last partial batch is dropped), random h-flips.

    Yields dicts {"images": (B, H, W, 3) float32, "labels": (B, H, W) int32}.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        x, y = images[index], labels[index]
        flip = rng.uniform(size=batch_size) < flip_prob
        if flip.any():
            x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
            y = np.where(flip[:, None, None], y[:, :, ::-1], y)
        yield {"images": np.ascontiguousarray(x), "labels": np.ascontiguousarray(y)}
