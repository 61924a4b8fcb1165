"""Losses of MCIBI training, with the reference's names and weighting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mcibi_jax.models.layers import accumulation_dtype, hold_on_cpu
from mcibi_jax.models.resize import resize

Array = jax.Array


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
    num_classes = logits.shape[-1]
    logits = logits.astype(accumulation_dtype(logits.dtype))
    valid = labels != ignore_label
    in_range = valid & (labels >= 0) & (labels < num_classes)
    safe = jnp.where(in_range, labels, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    # A select rather than a gather: the gather's gradient is a scatter-add (atomics on GPUs).
    picked = safe[..., None] == jnp.arange(num_classes)
    nll = -jnp.sum(jnp.where(picked, log_probs, 0.0), axis=-1)
    nll = jnp.where(in_range, nll, 0.0)

    def per_replica(x):
        return jnp.sum(x.reshape(num_replicas, -1), axis=1)

    return jnp.mean(per_replica(nll) / per_replica(valid))


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

    Logits are upsampled (bilinear) to the label size (N, H, W) before the loss.
    """
    size = labels.shape[1:3]

    def loss(logits: Array) -> Array:
        upsampled = resize(
            logits.astype(accumulation_dtype(logits.dtype)), size, "bilinear", align_corners
        )
        # XLA:CPU otherwise fuses the classifier's matmul (or the upsampling) into the
        # log-softmax's max: ViT-L's full-resolution auxiliary classifiers ran 3x slower so.
        upsampled = hold_on_cpu(upsampled)
        return cross_entropy(upsampled, labels, ignore_label, num_replicas)

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
