"""Generated segmentation scenes: textured shapes on a textured background (numpy only).

Class 0 is the background; every other class is drawn as ellipses, rectangles and
triangles. Each class has its own colour and its own stripe texture (frequency and
orientation), and every scene adds a random brightness shift, a random phase per shape and
pixel noise, so that colour alone is not quite enough: a small network learns it, but not
in a handful of steps. The class statistics are fixed; only the scene layout depends on the
seed, so splits made with different seeds are independent samples of the same task.
Pixels on shape boundaries are sometimes labelled ``IGNORE_LABEL``.

:class:`SyntheticData` hands the splits of ``config.dataset`` (``name = "synthetic"``,
configs/demo.py) to an experiment like any dataset (see :mod:`mcibi_jax.data.experiment_data`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mcibi_jax.config import ConfigError
from mcibi_jax.data.experiment_data import Batch, EvaluationData, steps_per_epoch
from mcibi_jax.sharding import global_batch

NAME = "synthetic"  # config.dataset.name
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
    return {
        "colour": colours,
        "frequency": frequency,
        "orientation": orientation,
        "amplitude": amplitude,
    }


def _texture(
    style: dict[str, np.ndarray], k: int, yy: np.ndarray, xx: np.ndarray, phase: float
) -> np.ndarray:
    """(H, W, 3) colour of class ``k`` everywhere."""
    theta = style["orientation"][k]
    wave = np.sin(style["frequency"][k] * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    return style["colour"][k] + style["amplitude"][k] * wave[..., None] * np.array(
        [1.0, -0.5, 0.75]
    )


def _shape_mask(
    kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator, size: tuple[int, int]
) -> np.ndarray:
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
    angles = (
        rng.uniform(0, 2 * np.pi)
        + np.array([0.0, 2.0, 4.0]) * np.pi / 3
        + rng.uniform(-0.3, 0.3, 3)
    )
    radius = max(ry, rx)
    corners = np.stack([cy + radius * np.sin(angles), cx + radius * np.cos(angles)], axis=1)
    inside = np.ones(yy.shape, bool)
    for i in range(3):
        (ay, ax), (by, bx) = corners[i], corners[(i + 1) % 3]
        (oy, ox) = corners[(i + 2) % 3]

        def side(py, px, ay=ay, ax=ax, by=by, bx=bx):  # which side of the edge a->b
            return (bx - ax) * (py - ay) - (by - ay) * (px - ax)

        inside &= np.sign(side(yy, xx)) == np.sign(side(oy, ox))
    return inside


def make_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    num_classes: int,
    style: dict[str, np.ndarray] | None = None,
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


def make_split(
    seed: int, n: int, size: tuple[int, int] | int, num_classes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
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
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    flip_prob: float = 0.0,
):
    """Shuffled full batches of one epoch (the last partial batch is dropped), random h-flips.

    Yields dicts {"images": (B, H, W, 3) float32, "labels": (B, H, W) int32}.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        x, y = images[index], labels[index]
        flip = rng.uniform(size=batch_size) < flip_prob
        if flip.any():
            x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
            y = np.where(flip[:, None, None], y[:, :, ::-1], y)
        yield {"images": np.ascontiguousarray(x), "labels": np.ascontiguousarray(y)}


# --------------------------------------------------------------------------------------------
# The splits of config.dataset as an experiment reads them


class SyntheticData:
    """``config.dataset``'s generated splits (``train`` and ``test``: ``seed``, ``num_images``
    each; ``image_size``, ``num_classes``), ``train_set`` for training and ``eval_set`` for
    evaluation; see :class:`mcibi_jax.data.experiment_data.ExperimentData`."""

    def __init__(self, config: Mapping[str, Any]):
        self._config = config

    def _split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        data = self._config["dataset"]
        split = data[data[which]]
        return make_split(
            int(split["seed"]),
            int(split["num_images"]),
            tuple(data["image_size"]),
            int(data["num_classes"]),
        )

    def training(self, mesh: Mesh) -> SyntheticTraining:
        images, labels = self._split("train_set")
        train = self._config["train"]
        return SyntheticTraining(
            images,
            labels,
            int(train["batch_size"]),
            mesh,
            seed=int(train["seed"]),
            flip_prob=float(self._config["dataset"]["train"]["flip_prob"]),
        )

    def evaluation(self) -> EvaluationData:
        images, labels = self._split("eval_set")
        share = np.array_split(np.arange(len(images)), jax.process_count())[jax.process_index()]
        mine_images, mine_labels = images[share], labels[share]  # each process scores its own share
        size = max(1, int(self._config["eval"]["batch_size"]))
        batches = (
            {"images": mine_images[i : i + size], "labels": mine_labels[i : i + size]}
            for i in range(0, len(mine_images), size)
        )
        return EvaluationData(
            batches, len(images), class_names(int(self._config["dataset"]["num_classes"]))
        )

    def submission(self) -> tuple[Any, int]:
        raise ConfigError(
            "eval.format_only writes files for a dataset's evaluation server; the synthetic dataset has "
            "none"
        )


class SyntheticTraining:
    """The global batches of each epoch: a pure function of the seed and the epoch (nothing to
    save with a checkpoint). Each host feeds its slice of every global batch."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        mesh: Mesh,
        *,
        seed: int,
        flip_prob: float,
    ):
        self._images, self._labels, self._mesh = images, labels, mesh
        self.batch_size, self.seed, self.flip_prob = batch_size, seed, flip_prob
        self.num_images = len(images)
        self.image_size = (int(images.shape[1]), int(images.shape[2]))
        self.steps_per_epoch = steps_per_epoch(self.num_images, batch_size)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        host, part = jax.process_index(), self.batch_size // jax.process_count()
        epoch_batches = batches(
            self._images,
            self._labels,
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            flip_prob=self.flip_prob,
        )
        for batch in itertools.islice(epoch_batches, skip, None):
            yield global_batch(
                {k: v[host * part : (host + 1) * part] for k, v in batch.items()}, self._mesh
            )

    def state(self) -> dict[str, Any]:
        # The epoch and the skipped steps say where the stream is; what made it is checked.
        return {"batch_size": self.batch_size, "num_images": self.num_images, "seed": self.seed}

    def restore(self, state: Any) -> None:
        now = self.state()
        changed = {k: v for k, v in (state or {}).items() if v != now.get(k)}
        if changed:
            differences = ", ".join(f"{k} {v} (now {now.get(k)})" for k, v in changed.items())
            raise ConfigError(
                f"cannot resume the synthetic input stream: the checkpoint's has {differences}. "
                "Resume with the config it was trained with, or use a new --workdir."
            )
