"""Inference over a dataset: whole-image prediction and confusion-matrix accumulation.

Only the 'whole' mode at a single scale without flipping is implemented so far: the
stage-2 logits (at head resolution) are upsampled bilinearly to the input size and the
argmax is the prediction. Sliding windows, multi-scale and flip are still missing.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax.evaluation.metrics import ConfusionMatrix, confusion_matrix
from mcibi_jax.models.resize import resize
from mcibi_jax.models.segmentor import MCIBI

Array = jax.Array


def check_inference_config(inference: Mapping[str, Any]) -> None:
    """Raises NotImplementedError for inference settings beyond single-scale whole images."""
    mode = inference.get("mode", "whole")
    scales = [float(s) for s in (inference.get("multiscale") or [1])]
    if mode != "whole" or scales != [1.0] or inference.get("flip", False):
        raise NotImplementedError(
            f"inference mode={mode!r}, multiscale={scales}, flip={inference.get('flip', False)} is not implemented yet; "
            "only whole-image, single-scale inference without flip is"
        )


def predict_logits(
    model: MCIBI, variables: Mapping[str, Any], images: Array, align_corners: bool = False, size: tuple[int, int] | None = None
) -> Array:
    """Stage-2 logits upsampled (bilinear) to ``size`` (default: the input's):
    (N, H, W, 3) -> (N, *size, K) float32. Evaluation passes the original label size, since
    the test pipeline may have resized the image."""
    outputs = model.apply(variables, images, train=False)
    logits = outputs["stage2"].astype(jnp.float32)
    return resize(logits, size or images.shape[1:3], "bilinear", align_corners)


def predict(
    model: MCIBI, variables: Mapping[str, Any], images: Array, align_corners: bool = False, size: tuple[int, int] | None = None
) -> Array:
    """Per-pixel classes (N, *size) int32 of normalised images (N, H, W, 3)."""
    return jnp.argmax(predict_logits(model, variables, images, align_corners, size), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "align_corners", "num_classes", "ignore_label"))
def _batch_confusion(model, variables, images, labels, *, align_corners, num_classes, ignore_label):
    predictions = predict(model, variables, images, align_corners, labels.shape[1:3])
    return confusion_matrix(predictions, labels, num_classes, ignore_label)


def evaluate(
    model: MCIBI,
    variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    num_classes: int,
    ignore_label: int = -100,
    align_corners: bool = False,
) -> dict[str, Any]:
    """Metrics (see :func:`mcibi_jax.evaluation.metrics.segmentation_metrics`) over ``batches``
    of {"images": (B, H, W, 3), "labels": (B, H, W)}; only the (K, K) counts leave the device."""
    matrix = ConfusionMatrix(num_classes)
    for batch in batches:
        matrix.add(_batch_confusion(
            model, variables, jnp.asarray(batch["images"], jnp.float32), jnp.asarray(batch["labels"]),
            align_corners=align_corners, num_classes=num_classes, ignore_label=ignore_label,
        ))
    return matrix.compute()
