"""Inference over a dataset: predictions under the config's inference settings and the
confusion-matrix accumulation behind the metrics."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mcibi_jax.config import ConfigError
from mcibi_jax.evaluation.metrics import ConfusionMatrix, confusion_matrix, segmentation_metrics
from mcibi_jax.evaluation.tta import tta_scores
from mcibi_jax.models.segmentor import MCIBI

Array = jax.Array
WHOLE_IMAGE = {
    "mode": "whole",
    "multiscale": [1.0],
    "flip": False,
    "use_probs_before_resize": False,
}


def check_inference_config(inference: Mapping[str, Any]) -> None:
    """Raises ConfigError for inference settings that cannot run."""
    mode = inference.get("mode", "whole")
    if mode not in ("whole", "slide"):
        raise ConfigError(f"inference mode {mode!r} is unknown; choose 'whole' or 'slide'")
    if mode == "slide":
        for key in ("cropsize", "stride"):
            value = inference.get(key) or ()
            if len(value) != 2 or min(int(v) for v in value) < 1:
                raise ConfigError(
                    f"sliding-window inference needs inference.{key}=(h, w), got {value!r}"
                )
    scales = [float(s) for s in (inference.get("multiscale") or [1.0])]
    if min(scales) <= 0:
        raise ConfigError(f"inference.multiscale must be positive, got {scales}")


def inference_settings(config: Mapping[str, Any], use_tta: bool | None = None) -> dict[str, Any]:
    """The settings an experiment config evaluates with: ``model.inference``, with the
    ``eval.tta_*`` values in place of its own when ``use_tta`` is true (``None``: when
    ``eval.use_tta`` is)."""
    settings = dict(config["model"]["inference"])
    evaluation = config["eval"]
    if use_tta is None:
        use_tta = bool(evaluation["use_tta"])
    if use_tta:
        for key in ("mode", "cropsize", "stride", "multiscale", "flip", "use_probs_before_resize"):
            if f"tta_{key}" in evaluation:
                settings[key] = evaluation[f"tta_{key}"]
    return settings


def evaluation_options(config: Mapping[str, Any], use_tta: bool | None = None) -> dict[str, Any]:
    """What an experiment config fixes for :func:`predict`, :func:`confusion_counts` and the
    submission writer: ``inference`` (:func:`inference_settings`, checked), ``align_corners``
    and ``flip_label_pairs`` (``dataset.train.flip_label_pairs``, swapped back after a flip)."""
    settings = inference_settings(config, use_tta)
    check_inference_config(settings)
    pairs = config["dataset"]["train"]["flip_label_pairs"]
    return {
        "inference": settings,
        "align_corners": bool(config["model"]["align_corners"]),
        "flip_label_pairs": tuple(tuple(int(c) for c in pair) for pair in pairs),
    }


def predict(
    model: MCIBI,
    variables: Mapping[str, Any],
    images: Array,
    inference: Mapping[str, Any] = WHOLE_IMAGE,
    *,
    align_corners: bool = False,
    flip_label_pairs: Sequence[Sequence[int]] = (),
    output_size: tuple[int, int] | None = None,
) -> Array:
    """Per-pixel classes (N, *output_size) int32 of normalised images (N, H, W, 3)."""
    scores = tta_scores(
        model,
        variables,
        images,
        inference,
        align_corners=align_corners,
        flip_label_pairs=flip_label_pairs,
        output_size=output_size,
    )
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_label"))
def _confusion(predictions: Array, labels: Array, num_classes: int, ignore_label: int) -> Array:
    return confusion_matrix(predictions, labels, num_classes, ignore_label)


def host_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The variables as host numpy arrays (replicated multi-host arrays included), ready to be
    placed on each local device."""
    return jax.tree_util.tree_map(np.asarray, dict(variables))


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """Sums an int64 array over the processes of a multi-host run (every process gets the sum)."""
    if jax.process_count() == 1:
        return counts

    counts = np.asarray(counts, np.int64)
    # Without jax_enable_x64 the gather would cast to int32: send 31-bit halves.
    low, high = (counts & 0x7FFFFFFF).astype(np.int32), (counts >> 31).astype(np.int32)
    gathered = multihost_utils.process_allgather({"low": low, "high": high})
    return (np.asarray(gathered["high"], np.int64) << 31).sum(0) + np.asarray(
        gathered["low"], np.int64
    ).sum(0)


def confusion_counts(
    model: MCIBI,
    variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    num_classes: int,
    ignore_label: int = -100,
    align_corners: bool = False,
    inference: Mapping[str, Any] = WHOLE_IMAGE,
    flip_label_pairs: Sequence[Sequence[int]] = (),
    devices: Sequence[jax.Device] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(K, K) int64 counts (rows: ground truth, columns: prediction) over ``batches`` of
    {"images": (B, H, W, 3), "labels": (B, H0, W0)}: predictions are made at the labels' size
    (the test pipeline may have resized the images); only (K, K) counts leave the device.

    Batches go round-robin to ``devices`` (default: this process's local devices), each holding
    a copy of the variables, so every device works on its own images (of any size). In a
    multi-host run each process passes its own share of the images and gets the sum over all
    processes. ``on_batch(num_images)`` is called after each batch is dispatched.
    """
    check_inference_config(inference)
    devices = list(devices or jax.local_devices())
    local = host_variables(variables)
    placed = [jax.device_put(local, device) for device in devices]
    matrix = ConfusionMatrix(num_classes)
    pending: list[Array] = []  # read one round late so that every device stays busy
    for index, batch in enumerate(batches):
        device = devices[index % len(devices)]
        labels = jax.device_put(np.asarray(batch["labels"]), device)
        images = jax.device_put(np.asarray(batch["images"], np.float32), device)
        predictions = predict(
            model,
            placed[index % len(devices)],
            images,
            inference,
            align_corners=align_corners,
            flip_label_pairs=flip_label_pairs,
            output_size=tuple(labels.shape[1:3]),
        )
        pending.append(_confusion(predictions, labels, num_classes, ignore_label))
        if len(pending) > len(devices):
            matrix.add(pending.pop(0))
        if on_batch is not None:
            on_batch(int(labels.shape[0]))
    for counts in pending:
        matrix.add(counts)
    return sum_over_processes(matrix.counts)


def evaluate(
    model: MCIBI,
    variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, np.ndarray]],
    **kwargs: Any,
) -> dict[str, Any]:
    """Metrics (see :func:`mcibi_jax.evaluation.metrics.segmentation_metrics`) of
    :func:`confusion_counts` (same arguments)."""
    return segmentation_metrics(confusion_counts(model, variables, batches, **kwargs))
