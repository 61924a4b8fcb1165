"""The dataset-level feature memory: reading it (a Flax module) and updating it (pure).

The memory is a float32 array of shape (num_classes, num_feats_per_cls, channels) kept in
the ``memory`` variable collection. It is read through each pixel's coarse class
probabilities and refined by attention; after each training step it moves toward the
features of the batch (:func:`update_memory`), never by gradients.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax.models.attention import SelfAttentionBlock
from mcibi_jax.models.layers import ConvBNReLU, accumulation_dtype, softmax
from mcibi_jax.models.resize import interpolation_matrix, resample

Array = jax.Array

STRATEGIES = ("cosine_similarity", "mean")
_COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default
DEFAULT_BAND_VALUES = 2**24  # 64 MiB of float32 label-resolution features at a time
SEGMENT_SUMS_ENV = "MCIBI_SEGMENT_SUMS"
SEGMENT_SUMS = ("scatter", "matmul")


class MemoryModule(nn.Module):
    """Reads the memory for every pixel and fuses it (and the ASPP context) with the features.

    Children mirror the released layout: ``self_attention`` (or ``self_attentions/<i>`` and
    ``fuse_memory_conv``), ``bottleneck``, ``self_attention_ms``, ``bottleneck_ms``.
    """

    num_classes: int
    feats_channels: int
    transform_channels: int
    out_channels: int
    num_feats_per_cls: int = 1
    use_context_within_image: bool = True
    use_hard_aggregate: bool = False
    update_strategy: str = "cosine_similarity"
    ignore_label: int = -100
    align_corners: bool = False
    negative_slope: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        feats: Array,
        class_logits: Array,
        context: Array | None,
        train: bool,
        labels: Array | None = None,
        momentum: Array | float | None = None,
        num_replicas: int = 1,
    ) -> tuple[Array, Array | None]:
        """Fused features and, when ``labels`` are given, each replica's updated memory.

        feats (N, h, w, C), class_logits (N, h, w, K), context (N, h, w, C) or None,
        labels (N, H, W) int -> ((N, h, w, out_channels), (R, K, F, C) or None).
        The batch is split into ``num_replicas`` equal consecutive parts, the way the
        reference's data-parallel GPUs each hold a part: each part updates its own copy of
        the memory (from ``feats`` upsampled to the label size); the caller averages them.
        The reference reads the memory in place, so its backward pass sees the (replica's)
        updated memory while its forward pass saw the old one; we reproduce that.
        """
        if self.num_feats_per_cls < 1:
            raise ValueError("num_feats_per_cls must be at least 1")
        shape = (self.num_classes, self.num_feats_per_cls, self.feats_channels)
        memory = self.variable("memory", "memory", lambda: jnp.zeros(shape, jnp.float32)).value
        replica_memories = None
        if labels is not None:
            # feats are upsampled to the labels' size inside, a band of rows at a time
            replica_memories = update_memory_per_replica(
                memory,
                feats,
                labels,
                num_replicas,
                momentum=momentum,
                strategy=self.update_strategy,
                ignore_label=self.ignore_label,
                align_corners=self.align_corners,
            )
        weights = softmax(class_logits)
        if self.use_hard_aggregate:
            weights = jax.nn.one_hot(
                jnp.argmax(weights, axis=-1), self.num_classes, dtype=weights.dtype
            )
        gradient_memory = (
            memory[None] if replica_memories is None else jax.lax.stop_gradient(replica_memories)
        )
        # (N, H, W, K) x (K, F, C) -> (N, H, W, F, C): each pixel's expected memory vectors.
        selected = read_memory(weights, memory, gradient_memory).astype(feats.dtype)
        attention_kwargs = dict(
            transform_channels=self.transform_channels,
            out_channels=self.feats_channels,
            negative_slope=self.negative_slope,
            dtype=self.dtype,
        )
        conv_kwargs = dict(negative_slope=self.negative_slope, dtype=self.dtype)
        if self.num_feats_per_cls > 1:
            attended = SlotAttentions(
                self.num_feats_per_cls, attention_kwargs, name="self_attentions"
            )(feats, selected, train)
            selected_memory = ConvBNReLU(
                self.feats_channels, 1, **conv_kwargs, name="fuse_memory_conv"
            )(attended, train)
        else:
            selected_memory = SelfAttentionBlock(**attention_kwargs, name="self_attention")(
                feats, selected[..., 0, :], train
            )
        output = ConvBNReLU(self.out_channels, 3, **conv_kwargs, name="bottleneck")(
            jnp.concatenate([feats, selected_memory], axis=-1), train
        )
        if self.use_context_within_image:
            context = SelfAttentionBlock(**attention_kwargs, name="self_attention_ms")(
                feats, context, train
            )
            output = ConvBNReLU(self.out_channels, 3, **conv_kwargs, name="bottleneck_ms")(
                jnp.concatenate([context, output], axis=-1), train
            )
        return output, replica_memories


@jax.custom_vjp
def read_memory(weights: Array, memory: Array, gradient_memory: Array) -> Array:
    """(N, H, W, K) x (K, F, C) -> (N, H, W, F, C).

    The gradient with respect to ``weights`` uses ``gradient_memory`` (R, K, F, C): replica r's
    memory for the r-th of R equal consecutive parts of the batch.
    """
    return jnp.einsum("nhwk,kfc->nhwfc", weights, memory, precision="highest")


def _read_memory_fwd(weights, memory, gradient_memory):
    return read_memory(weights, memory, gradient_memory), (weights, memory, gradient_memory)


def _read_memory_bwd(residuals, grad):
    weights, memory, gradient_memory = residuals
    replicas = gradient_memory.shape[0]
    grad = grad.reshape(replicas, -1, *grad.shape[1:])
    grad_weights = jnp.einsum(
        "rnhwfc,rkfc->rnhwk", grad, gradient_memory, precision="highest"
    ).reshape(weights.shape)
    return (
        grad_weights.astype(weights.dtype),
        jnp.zeros_like(memory),
        jnp.zeros_like(gradient_memory),
    )


read_memory.defvjp(_read_memory_fwd, _read_memory_bwd)


class SlotAttentions(nn.Module):
    """One attention block per memory slot (children "0", "1", ...); outputs concatenated."""

    num_slots: int
    attention_kwargs: dict

    @nn.compact
    def __call__(self, feats: Array, selected: Array, train: bool) -> Array:
        """feats (N, H, W, C), selected (N, H, W, F, C) -> (N, H, W, F * C)."""
        return jnp.concatenate(
            [
                SelfAttentionBlock(**self.attention_kwargs, name=str(i))(
                    feats, selected[..., i, :], train
                )
                for i in range(self.num_slots)
            ],
            axis=-1,
        )


def memory_momentum(
    learning_rate: Array | float,
    *,
    base_momentum: float,
    base_lr: float,
    adjust_by_learning_rate: bool,
) -> Array | float:
    """The update momentum; the reference ties it to the learning rate's decay."""
    if adjust_by_learning_rate:
        return base_momentum / base_lr * learning_rate
    return base_momentum


def _normalize(x: Array) -> Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORMALIZE_EPS)


def update_memory_per_replica(
    memory: Array,
    features: Array,
    labels: Array,
    num_replicas: int,
    *,
    momentum: Array | float,
    strategy: str = "cosine_similarity",
    ignore_label: int = -100,
    align_corners: bool = False,
) -> Array:
    """:func:`update_memory` on each of ``num_replicas`` equal consecutive parts of the batch.

    Returns (R, K, F, C); their mean is the memory the reference's data-parallel GPUs agree on
    after their all-reduce.
    """
    batch = features.shape[0]
    if num_replicas < 1 or batch % num_replicas:
        raise ValueError(
            f"a batch of {batch} cannot be split into {num_replicas} equal replica parts"
        )

    def split(x):
        return x.reshape(num_replicas, batch // num_replicas, *x.shape[1:])

    update = functools.partial(
        update_memory,
        momentum=momentum,
        strategy=strategy,
        ignore_label=ignore_label,
        align_corners=align_corners,
    )
    return jax.vmap(update, in_axes=(None, 0, 0))(memory, split(features), split(labels))


def update_memory(
    memory: Array,
    features: Array,
    labels: Array,
    *,
    momentum: Array | float,
    strategy: str = "cosine_similarity",
    ignore_label: int = -100,
    align_corners: bool = False,
    band_values: int = DEFAULT_BAND_VALUES,
    segment_sums: str | None = None,
) -> Array:
    """Moves the memory toward the features of each class present in the batch.

    Args:
      memory: (K, F, C) float32, K classes with F vectors each.
      features: (N, h, w, C) features (no gradient flows) at the labels' resolution, or lower:
        then bilinearly upsampled to it (like ``resize(..., align_corners)``).
      labels: (N, H, W) int class ids; ``ignore_label`` (and any id outside [0, K)) is skipped.
      momentum: weight of the batch in the new memory.
      strategy: ``cosine_similarity`` weights each pixel by its dissimilarity to the current
        memory vector; ``mean`` uses the plain class mean (only with F == 1).
      band_values: the label-resolution features are formed and summed one band of rows at a
        time, each of about this many values, so that the full-resolution (N, H, W, C) array
        never exists (it is 1 GiB per 512x1024 image with 512 channels).
      segment_sums: how the per-class sums over pixels run, ``scatter`` (scatter-adds) or
        ``matmul`` (one-hot matrix products); None: :func:`segment_sums_method`.
    Returns:
      The new memory (K, F, C). For each class present, the first all-zero vector is set to
      the class mean instead (and nothing else of that class moves this step).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown memory update strategy {strategy!r}; choose from {STRATEGIES}")
    num_classes, num_feats, channels = memory.shape
    if strategy == "mean" and num_feats > 1:
        raise ValueError("the 'mean' strategy needs one memory vector per class")
    sums = segment_sums_method(segment_sums)
    memory = jnp.asarray(memory)
    memory = memory.astype(accumulation_dtype(memory.dtype))
    features = jax.lax.stop_gradient(jnp.asarray(features)).astype(memory.dtype)
    labels = jnp.asarray(labels).astype(jnp.int32)
    (batch, in_h, in_w, _), (out_h, out_w) = features.shape, labels.shape[1:3]
    rows = int(max(1, min(out_h, band_values // max(1, batch * out_w * channels))))
    num_bands = -(-out_h // rows)
    pad = num_bands * rows - out_h
    # Rows past the labels' height get label -1 (skipped) and zero features.
    band_labels = jnp.pad(labels, ((0, 0), (0, pad), (0, 0)), constant_values=-1)
    band_labels = band_labels.reshape(batch, num_bands, rows, out_w).transpose(1, 0, 2, 3)
    if (in_h, in_w) == (out_h, out_w):
        padded = jnp.pad(features, ((0, 0), (0, pad), (0, 0), (0, 0)))

        def band_features(index):
            return jax.lax.dynamic_slice_in_dim(padded, index * rows, rows, axis=1)
    else:
        row_matrix = np.zeros((num_bands * rows, in_h))
        row_matrix[:out_h] = interpolation_matrix(in_h, out_h, "bilinear", align_corners)
        row_bands = jnp.asarray(row_matrix.reshape(num_bands, rows, in_h), memory.dtype)
        column_matrix = jnp.asarray(
            interpolation_matrix(in_w, out_w, "bilinear", align_corners), memory.dtype
        )

        def band_features(index):  # the rows of resize(features, (out_h, out_w)) in this band
            return resample(features, row_bands[index], column_matrix)

    def add_band(totals, band):
        index, labels_of_band = band
        stats = _class_statistics(
            memory,
            band_features(index).reshape(-1, channels),
            labels_of_band.reshape(-1),
            strategy,
            ignore_label,
            sums,
        )
        return jax.tree_util.tree_map(jnp.add, totals, stats), None

    shapes = jax.eval_shape(
        lambda: _class_statistics(
            memory,
            features[:1, :1, :1].reshape(-1, channels),
            labels[:1, :1, :1].reshape(-1),
            strategy,
            ignore_label,
            sums,
        )
    )
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    stats, _ = jax.lax.scan(add_band, zeros, (jnp.arange(num_bands), band_labels))
    return _moved_memory(memory, stats, momentum, strategy)


def segment_sums_method(method: str | None = None) -> str:
    """``method``, else the ``MCIBI_SEGMENT_SUMS`` environment variable (read when the update is
    traced), else ``scatter``. ``matmul`` sums pixels per class as one-hot matrix products
    instead of scatter-adds (which accelerators run as atomic adds into a few class rows); an
    option to measure there, with the same sums up to float32 rounding."""
    method = method or os.environ.get(SEGMENT_SUMS_ENV) or "scatter"
    if method not in SEGMENT_SUMS:
        raise ValueError(f"unknown segment_sums {method!r}; choose from {', '.join(SEGMENT_SUMS)}")
    return method


def _segment_sums(values: Array, segments: Array, num_segments: int, method: str) -> Array:
    """Sums of values (P,) or (P, C) per segment id (P,) in [0, num_segments)."""
    if method == "scatter":
        return jax.ops.segment_sum(values, segments, num_segments)
    one_hot = jax.nn.one_hot(segments, num_segments, dtype=values.dtype)  # (P, S)
    if values.ndim == 1:
        return jnp.sum(one_hot * values[:, None], axis=0)
    return jnp.einsum("ps,pc->sc", one_hot, values, precision="highest")


def _class_statistics(
    memory: Array, feats: Array, labels: Array, strategy: str, ignore_label: int, sums: str
) -> dict[str, Array]:
    """Sums over pixels (feats (P, C), labels (P,)) that the update needs; they add up over
    parts of the batch: pixel count and feature sum per class, and for ``cosine_similarity``
    the dissimilarity weight and weighted feature sum per memory slot (``sums``: how,
    :func:`segment_sums_method`)."""
    num_classes, num_feats, channels = memory.shape
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    # Invalid pixels go to an extra segment K that is dropped.
    segment = jnp.where(valid, labels, num_classes)
    stats = {
        "count": _segment_sums(valid.astype(memory.dtype), segment, num_classes + 1, sums)[
            :num_classes
        ],
        "sum": _segment_sums(feats, segment, num_classes + 1, sums)[:num_classes],
    }
    if strategy == "mean":
        return stats
    safe_labels = jnp.minimum(segment, num_classes - 1)
    if num_feats == 1:
        slot = jnp.zeros_like(safe_labels)
    else:
        class_memory = memory[safe_labels]  # (P, F, C)
        relation = jnp.einsum(
            "pc,pfc->pf", _normalize(feats), _normalize(class_memory), precision="highest"
        )
        slot = jnp.argmax(relation, axis=-1)
    # The cosine with each pixel's own memory slot from one matmul against all slots: gathering
    # the slot per pixel and reducing (P, C) products took 0.2 s a band on XLA:CPU.
    slots = memory.reshape(num_classes * num_feats, channels)
    own_slot = (safe_labels * num_feats + slot)[:, None]
    dots = jnp.take_along_axis(jnp.dot(feats, slots.T, precision="highest"), own_slot, axis=1)
    squares = jnp.dot(feats * feats, jnp.ones((channels,), feats.dtype), precision="highest")
    norm_feats = jnp.maximum(jnp.sqrt(squares), _COSINE_EPS)
    norm_slots = jnp.maximum(jnp.linalg.norm(slots, axis=-1), _COSINE_EPS)[own_slot[:, 0]]
    cosine = dots[:, 0] / (norm_feats * norm_slots)
    dissimilarity = jnp.where(valid, 1.0 - cosine, 0.0)
    slot_segment = jnp.where(valid, safe_labels * num_feats + slot, num_classes * num_feats)
    num_segments = num_classes * num_feats + 1
    stats["weight"] = _segment_sums(dissimilarity, slot_segment, num_segments, sums)[:-1]
    stats["weighted"] = _segment_sums(
        feats * dissimilarity[:, None], slot_segment, num_segments, sums
    )[:-1]
    return stats


def _moved_memory(
    memory: Array, stats: dict[str, Array], momentum: Array | float, strategy: str
) -> Array:
    num_classes, num_feats, channels = memory.shape
    count = stats["count"]
    class_mean = stats["sum"] / jnp.maximum(count, 1.0)[:, None]
    present = count > 0
    if strategy == "mean":
        batch_vectors = class_mean[:, None, :]
    else:
        total = stats["weight"]
        # A slot that no pixel chose gets a zero batch vector: the reference then only decays it.
        batch_vectors = (stats["weighted"] / jnp.where(total == 0, 1.0, total)[:, None]).reshape(
            num_classes, num_feats, channels
        )
    momentum = jnp.asarray(momentum, memory.dtype)
    moved = (1.0 - momentum) * memory + momentum * batch_vectors

    is_zero = jnp.all(memory == 0, axis=-1)  # (K, F)
    has_zero = jnp.any(is_zero, axis=-1)
    first_zero = (
        jax.nn.one_hot(jnp.argmax(is_zero, axis=-1), num_feats, dtype=bool) & has_zero[:, None]
    )
    initialised = jnp.where(first_zero[..., None], class_mean[:, None, :], memory)
    new_memory = jnp.where(has_zero[:, None, None], initialised, moved)
    return jnp.where(present[:, None, None], new_memory, memory)
