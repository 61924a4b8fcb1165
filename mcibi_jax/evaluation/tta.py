"""Test-time inference as the reference runs it: whole image or sliding windows, at several
scales, with horizontal flips, averaged at the original size.

For each scale ``s`` the (normalised) images are resized by ``s`` (PyTorch's
``scale_factor`` semantics); the model runs on the whole image (scores at head resolution) or
on overlapping windows (each window's scores upsampled to the window, summed on a canvas and
divided by the number of windows covering each pixel); with ``use_probs_before_resize`` the
scores are softmax probabilities, else logits. With ``flip`` the mirrored image is scored too
(class pairs such as LIP's left/right parts swapped back). Every result is resized to the
original size and the results are averaged.

Windows are streamed through a ``lax.scan``, so memory stays bounded by one window's
activations plus the canvas, whatever the image size.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax.models.resize import resize, scaled_size
from mcibi_jax.models.segmentor import MCIBI

Array = jax.Array


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis (the last window is flush with the end)."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]


def _scores(logits: Array, probabilities: bool) -> Array:
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if probabilities else logits


@functools.partial(jax.jit, static_argnames=("model", "probabilities"))
def whole_scores(
    model: MCIBI, variables: Mapping[str, Any], images: Array, probabilities: bool
) -> Array:
    """Stage-2 scores at head resolution: (N, H, W, 3) -> (N, h, w, K)."""
    return _scores(model.apply(variables, images, train=False)["stage2"], probabilities)


@functools.partial(
    jax.jit, static_argnames=("model", "crop", "stride", "probabilities", "align_corners")
)
def slide_scores(
    model: MCIBI,
    variables: Mapping[str, Any],
    images: Array,
    crop: tuple[int, int],
    stride: tuple[int, int],
    probabilities: bool,
    align_corners: bool,
) -> Array:
    """Sliding-window scores at the input size: (N, H, W, 3) -> (N, H, W, K)."""
    n, height, width, _ = images.shape
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    starts = np.array(
        [
            (y, x)
            for y in window_starts(height, crop[0], stride[0])
            for x in window_starts(width, crop[1], stride[1])
        ],
        np.int32,
    )
    count = np.zeros((height, width), np.float32)
    for y, x in starts:
        count[y : y + crop_h, x : x + crop_w] += 1

    def score_window(canvas, start):
        window = jax.lax.dynamic_slice(
            images, (0, start[0], start[1], 0), (n, crop_h, crop_w, images.shape[-1])
        )
        logits = model.apply(variables, window, train=False)["stage2"].astype(jnp.float32)
        scores = _scores(resize(logits, (crop_h, crop_w), "bilinear", align_corners), probabilities)
        current = jax.lax.dynamic_slice(canvas, (0, start[0], start[1], 0), scores.shape)
        return jax.lax.dynamic_update_slice(
            canvas, current + scores, (0, start[0], start[1], 0)
        ), None

    num_classes = jax.eval_shape(
        lambda w: model.apply(variables, w, train=False)["stage2"],
        jax.ShapeDtypeStruct((n, crop_h, crop_w, images.shape[-1]), images.dtype),
    ).shape[-1]
    canvas = jnp.zeros((n, height, width, num_classes), jnp.float32)
    canvas, _ = jax.lax.scan(score_window, canvas, jnp.asarray(starts))
    return canvas / jnp.asarray(count)[None, :, :, None]


def inference_scores(
    model: MCIBI,
    variables: Mapping[str, Any],
    images: Array,
    inference: Mapping[str, Any],
    align_corners: bool,
) -> Array:
    """One scale, no flip: the reference's ``inference``. Whole mode keeps head resolution."""
    probabilities = bool(inference.get("use_probs_before_resize", False))
    if inference.get("mode", "whole") == "whole":
        return whole_scores(model, variables, images, probabilities)
    if inference.get("mode") != "slide":
        raise ValueError(
            f"unknown inference mode {inference.get('mode')!r}; choose 'whole' or 'slide'"
        )
    crop, stride = (
        tuple(int(v) for v in inference["cropsize"]),
        tuple(int(v) for v in inference["stride"]),
    )
    return slide_scores(model, variables, images, crop, stride, probabilities, align_corners)


def tta_scores(
    model: MCIBI,
    variables: Mapping[str, Any],
    images: Array,
    inference: Mapping[str, Any],
    *,
    align_corners: bool = False,
    flip_label_pairs: Sequence[Sequence[int]] = (),
    output_size: tuple[int, int] | None = None,
) -> Array:
    """Averaged scores (N, *output_size, K) of images (N, H, W, 3) under ``inference``'s
    multiscale / flip settings (``output_size`` defaults to the input size)."""
    images = jnp.asarray(images, jnp.float32)
    output_size = tuple(output_size or images.shape[1:3])
    results = []
    for scale in inference.get("multiscale") or [1.0]:
        scale = float(scale)
        scaled = resize(
            images,
            scaled_size(images.shape[1:3], scale),
            "bilinear",
            align_corners,
            scale_factor=scale,
        )
        results.append(inference_scores(model, variables, scaled, inference, align_corners))
        if inference.get("flip", False):
            flipped = inference_scores(
                model, variables, scaled[:, :, ::-1], inference, align_corners
            )
            flipped = flipped[..., _swap_permutation(flipped.shape[-1], flip_label_pairs)]
            results.append(flipped[:, :, ::-1])
    return sum(resize(r, output_size, "bilinear", align_corners) for r in results) / len(results)


def _swap_permutation(num_classes: int, pairs: Sequence[Sequence[int]]) -> np.ndarray:
    order = np.arange(num_classes)
    for a, b in pairs:
        order[a], order[b] = order[b], order[a]
    return order
