"""Segmentation metrics from a confusion matrix, with the reference's conventions.

Pixels whose label is the ignore label, or outside [0, K) (the reference maps those to its
ignore index), are left out. Per class c with intersection I = C[c, c], ground-truth area
G = sum_j C[c, j] and predicted area P = sum_i C[i, c]:

    IoU_c = I / (G + P - I)      Acc_c = I / G      aAcc = sum I / sum G

A class absent from both ground truth and prediction has IoU NaN (0 / 0), a class absent
from the ground truth has Acc NaN; mIoU and mAcc are means over the non-NaN classes
(``np.nanmean``), as the reference computes them.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def confusion_matrix(
    predictions: Array, labels: Array, num_classes: int, ignore_label: int = -100
) -> Array:
    """(K, K) int32 counts, rows = ground truth, columns = prediction. Works under jit.

    predictions, labels: int arrays of the same shape; predictions in [0, K).
    """
    labels = jnp.asarray(labels).reshape(-1)
    predictions = jnp.asarray(predictions).reshape(-1)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates confusion matrices (int64 on the host) over an evaluation."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = np.zeros((num_classes, num_classes), np.int64)

    def add(self, counts: Any) -> None:
        counts = np.asarray(counts)
        if counts.shape != self.counts.shape:
            raise ValueError(
                f"confusion matrix of shape {counts.shape}, expected {self.counts.shape}"
            )
        self.counts += counts.astype(np.int64)

    def update(self, predictions: Any, labels: Any, ignore_label: int = -100) -> None:
        self.add(confusion_matrix(predictions, labels, self.num_classes, ignore_label))

    def compute(self) -> dict[str, Any]:
        return segmentation_metrics(self.counts)


def segmentation_metrics(counts: Any) -> dict[str, Any]:
    """{"mIoU", "aAcc", "mAcc": float; "IoU", "Acc": (K,) float64 with NaN} of a (K, K) matrix."""
    counts = np.asarray(counts, np.float64)
    intersection = np.diag(counts)
    label_area = counts.sum(axis=1)
    prediction_area = counts.sum(axis=0)
    union = label_area + prediction_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN
        iou = intersection / union
        acc = intersection / label_area
        return {
            "mIoU": float(np.nanmean(iou)),
            "aAcc": float(intersection.sum() / label_area.sum()),
            "mAcc": float(np.nanmean(acc)),
            "IoU": iou,
            "Acc": acc,
        }


def format_table(metrics: dict[str, Any], class_names: list[str] | None = None) -> str:
    """A per-class IoU / Acc table followed by the summary line (percentages)."""
    iou, acc = metrics["IoU"], metrics["Acc"]
    names = class_names or [str(i) for i in range(len(iou))]
    width = max(5, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, i, a in zip(names, iou, acc):
        lines.append(f"{name:<{width}}  {_pct(i):>6}  {_pct(a):>6}")
    lines.append(
        f"mIoU {_pct(metrics['mIoU'])}  aAcc {_pct(metrics['aAcc'])}  mAcc {_pct(metrics['mAcc'])}"
    )
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "nan" if np.isnan(value) else f"{100 * value:.2f}"


PERCENT_KEYS = ("mIoU", "aAcc", "mAcc", "IoU", "Acc")


def as_percent(metrics: dict[str, Any]) -> dict[str, Any]:
    """Copy of :func:`segmentation_metrics`' result in percent (0-100), the one unit of every
    score the package reports (logs, metrics.jsonl, results.json, best.json, TensorBoard), as
    the reference's logs and the published tables."""

    def scale(v: Any) -> Any:
        return 100 * np.asarray(v, np.float64) if isinstance(v, np.ndarray) else 100 * float(v)

    return {k: scale(v) if k in PERCENT_KEYS else v for k, v in metrics.items()}


def to_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy: arrays to lists, NaN to None."""

    def clean(v):
        if isinstance(v, np.ndarray):
            return [clean(x) for x in v.tolist()]
        if isinstance(v, float) and np.isnan(v):
            return None
        return v

    return {k: clean(v) for k, v in metrics.items()}
