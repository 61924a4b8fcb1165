"""Losses of MCIBI training, with the reference's names and weighting."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax.models.layers import accumulation_dtype, balanced_parts, hold_on_cpu, size_limit
from mcibi_jax.models.resize import interpolation_matrix, resample, resize

Array = jax.Array

# Most float32 logits of one image upsampled to the label size at once on accelerators. Above
# this (ADE20k's 150 classes at 512x512: 39M), the loss runs over bands of label rows, one at a
# time, and the backward pass recomputes each band instead of keeping the upsampled logits, their
# softmax and the class masks of the whole label map: memory linear in the band, not the map.
MAX_LOSS_BAND_ELEMENTS = 1 << 22
# Overrides that limit when the step is traced (0: never in bands).
LOSS_BAND_ENV = "MCIBI_LOSS_BAND_ELEMENTS"


def cross_entropy(
    logits: Array, labels: Array, ignore_label: int = -100, num_replicas: int = 1
) -> Array:
    """Mean softmax cross-entropy over the pixels whose label is not ``ignore_label``.

    logits (N, ..., K), labels (N, ...) int. With ``num_replicas`` R, the mean is taken within
    each of R equal consecutive parts of the batch and then averaged, as data-parallel
    training with per-GPU losses does. Labels outside [0, K) other than the ignore label
    count as class 0 with zero loss, as the reference's one-hot trick does; data pipelines
    should never produce them.
    """
    nll, valid = _pixel_nll(logits, labels, labels != ignore_label)
    return _replica_mean(nll, valid, num_replicas)


def _pixel_nll(logits: Array, labels: Array, valid: Array) -> tuple[Array, Array]:
    """Each pixel's negative log-likelihood (0 where not ``valid`` or out of range), and ``valid``."""
    num_classes = logits.shape[-1]
    logits = logits.astype(accumulation_dtype(logits.dtype))
    in_range = valid & (labels >= 0) & (labels < num_classes)
    safe = jnp.where(in_range, labels, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    # A select rather than a gather: the gather's gradient is a scatter-add (atomics on GPUs).
    picked = safe[..., None] == jnp.arange(num_classes)
    nll = -jnp.sum(jnp.where(picked, log_probs, 0.0), axis=-1)
    return jnp.where(in_range, nll, 0.0), valid


def _replica_mean(nll: Array, valid: Array, num_replicas: int) -> Array:
    """The mean of ``nll`` over the ``valid`` entries of each of ``num_replicas`` equal
    consecutive parts of the batch (axis 0), averaged over the parts."""

    def per_replica(x):
        return jnp.sum(x.reshape(num_replicas, -1), axis=1)

    return jnp.mean(per_replica(nll) / per_replica(valid))


def loss_band_limit() -> int:
    """``MCIBI_LOSS_BAND_ELEMENTS`` when set, else :data:`MAX_LOSS_BAND_ELEMENTS` on accelerators
    and no bands on CPUs (whose memory is rarely the limit: ViT-L's CPU train step ran 5 % slower
    in bands)."""
    default = sys.maxsize if jax.default_backend() == "cpu" else MAX_LOSS_BAND_ELEMENTS
    return size_limit(LOSS_BAND_ENV, default, "logits per image")


def upsampled_cross_entropy(
    logits: Array,
    labels: Array,
    ignore_label: int = -100,
    num_replicas: int = 1,
    align_corners: bool = False,
    max_band_elements: int | None = None,
) -> Array:
    """:func:`cross_entropy` of ``logits`` (N, h, w, K) upsampled (bilinear, in float32) to the
    size of ``labels`` (N, H, W).

    When one image's upsampled logits (H * W * K) exceed ``max_band_elements`` (default
    :func:`loss_band_limit`), the label rows go through in balanced bands of at most that many
    logits, one band at a time (zero rows pad the last), and the backward pass recomputes each
    band: the same sums, to float32 rounding (``tests/test_losses.py``). Logits already at the
    label size are not banded; their softmax is recomputed in the backward pass instead of kept.
    """
    n, h, w, num_classes = logits.shape
    out_h, out_w = labels.shape[1:3]
    wide = logits.astype(accumulation_dtype(logits.dtype))
    band_rows = max(1, (max_band_elements or loss_band_limit()) // (out_w * num_classes))
    if out_h <= band_rows:
        upsampled = resize(wide, (out_h, out_w), "bilinear", align_corners)
        # XLA:CPU otherwise fuses the classifier's matmul (or the upsampling) into the
        # log-softmax's max: ViT-L's full-resolution auxiliary classifiers ran 3x slower so.
        return cross_entropy(hold_on_cpu(upsampled), labels, ignore_label, num_replicas)
    if (h, w) == (out_h, out_w):
        # Logits at the label size already (ViT-L's auxiliary heads): nothing to upsample, and
        # recomputing the softmax from them in the backward pass keeps nothing of the size of
        # the logits either (the loss itself is a reduction).
        loss = jax.checkpoint(cross_entropy, static_argnums=(2, 3))
        return loss(hold_on_cpu(wide), labels, ignore_label, num_replicas)
    num_bands, band_rows = balanced_parts(out_h, band_rows)
    padding = num_bands * band_rows - out_h
    rows = np.pad(interpolation_matrix(h, out_h, "bilinear", align_corners), ((0, padding), (0, 0)))
    columns = jnp.asarray(interpolation_matrix(w, out_w, "bilinear", align_corners), wide.dtype)
    real_row = np.arange(num_bands * band_rows).reshape(num_bands, band_rows) < out_h
    labels = jnp.pad(labels, ((0, 0), (0, padding), (0, 0)))

    def band_sums(band: tuple[Array, Array, Array]) -> tuple[Array, Array]:
        band_matrix, band_labels, band_real = band
        upsampled = hold_on_cpu(resample(wide, band_matrix, columns))
        valid = (band_labels != ignore_label) & band_real[None, :, None]
        nll, valid = _pixel_nll(upsampled, band_labels, valid)
        return jnp.sum(nll, axis=(1, 2)), jnp.sum(valid, axis=(1, 2))

    bands = (
        jnp.asarray(rows.reshape(num_bands, band_rows, h), wide.dtype),
        labels.reshape(n, num_bands, band_rows, out_w).swapaxes(0, 1),
        jnp.asarray(real_row),
    )
    nll, valid = jax.lax.map(jax.checkpoint(band_sums), bands)  # (num_bands, N) each
    return _replica_mean(jnp.sum(nll, axis=0), jnp.sum(valid, axis=0), num_replicas)


def segmentation_losses(
    outputs: Mapping[str, Any],
    labels: Array,
    loss_weights: Mapping[str, Any],
    *,
    ignore_label: int = -100,
    align_corners: bool = False,
    num_replicas: int = 1,
) -> dict[str, Array]:
    """Weighted losses of both stages and the auxiliary heads, named as the reference logs them.

    Logits are upsampled (bilinear) to the label size (N, H, W) before the loss (in bands of
    rows for large label maps: :func:`upsampled_cross_entropy`).
    """

    def loss(logits: Array) -> Array:
        return upsampled_cross_entropy(logits, labels, ignore_label, num_replicas, align_corners)

    losses = {}
    aux = outputs.get("aux", ())
    aux_weights = tuple(loss_weights["aux"])
    if len(aux) != len(aux_weights):
        raise ValueError(
            f"{len(aux)} auxiliary outputs but {len(aux_weights)} auxiliary loss weights"
        )
    if len(aux) == 1:
        losses["loss_aux"] = aux_weights[0] * loss(aux[0])
    else:
        for i, (logits, weight) in enumerate(zip(aux, aux_weights)):
            losses[f"loss_aux{i + 1}"] = weight * loss(logits)
    losses["loss_cls_stage1"] = loss_weights["stage1"] * loss(outputs["stage1"])
    losses["loss_cls_stage2"] = loss_weights["stage2"] * loss(outputs["stage2"])
    return losses


def memory_loss(
    memory_logits: Array, num_feats_per_cls: int, weight: float, num_replicas: int = 1
) -> Array:
    """Each memory vector, through the stage-2 decoder, should be classified as its class.

    memory_logits (R * K * F, K): each replica's memory, rows ordered class-major as
    ``memory.reshape(R * K * F, C)``.
    """
    num_classes = memory_logits.shape[-1]
    targets = jnp.tile(jnp.repeat(jnp.arange(num_classes), num_feats_per_cls), num_replicas)
    return weight * cross_entropy(memory_logits, targets, num_replicas=num_replicas)
