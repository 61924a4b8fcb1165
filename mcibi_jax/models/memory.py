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
from jax.ad_checkpoint import checkpoint_name

from mcibi_jax.models.attention import SelfAttentionBlock
from mcibi_jax.models.layers import ConvBNReLU, accumulation_dtype, softmax
from mcibi_jax.models.resize import interpolation_matrix

Array = jax.Array

STRATEGIES = ("cosine_similarity", "mean")
_COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default
# The updated memories carry this name: a rematerialised head keeps them (the backward pass reads
# them, and recomputing them would redo the update at label resolution).
MEMORY_UPDATE = "memory_update"
SUMS_ENV = "MCIBI_MEMORY_SUMS"
SUMS_METHODS = ("auto", "scatter", "matmul")


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
            replica_memories = checkpoint_name(replica_memories, MEMORY_UPDATE)
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
) -> Array:
    """Moves the memory toward the features of each class present in the batch.

    Args:
      memory: (K, F, C) float32, K classes with F vectors each.
      features: (N, h, w, C) features (no gradient flows) at the labels' resolution, or lower:
        then bilinearly upsampled to it (like ``resize(..., align_corners)``), which the update
        never does explicitly (see :func:`_class_statistics`).
      labels: (N, H, W) int class ids; ``ignore_label`` (and any id outside [0, K)) is skipped.
      momentum: weight of the batch in the new memory.
      strategy: ``cosine_similarity`` weights each pixel by its dissimilarity to the current
        memory vector; ``mean`` uses the plain class mean (only with F == 1).
    Returns:
      The new memory (K, F, C). For each class present, the first all-zero vector is set to
      the class mean instead (and nothing else of that class moves this step).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown memory update strategy {strategy!r}; choose from {STRATEGIES}")
    num_feats = memory.shape[1]
    if strategy == "mean" and num_feats > 1:
        raise ValueError("the 'mean' strategy needs one memory vector per class")
    memory = jnp.asarray(memory)
    memory = memory.astype(accumulation_dtype(memory.dtype))
    features = jax.lax.stop_gradient(jnp.asarray(features)).astype(memory.dtype)
    labels = jnp.asarray(labels).astype(jnp.int32)
    stats = _class_statistics(memory, features, labels, strategy, ignore_label, align_corners)
    return _moved_memory(memory, stats, momentum, strategy)


def memory_sums_method(backend: str | None = None) -> str:
    """How the update sums over label pixels: ``MCIBI_MEMORY_SUMS`` (environment, read when the
    update is traced), one of ``auto`` (the default: ``matmul`` on TPUs, ``scatter`` elsewhere),
    ``scatter`` (per-pixel scatter-adds into bins and gathers from the grid) or ``matmul`` (the
    same sums as dense products with one-hot and interpolation matrices, which TPUs run on their
    matrix units instead of serialised scatters). ``backend`` defaults to ``jax.default_backend()``."""
    method = os.environ.get(SUMS_ENV, "").strip() or "auto"
    if method not in SUMS_METHODS:
        raise ValueError(f"{SUMS_ENV}={method!r}: expected one of {', '.join(SUMS_METHODS)}")
    if method == "auto":
        return "matmul" if (backend or jax.default_backend()) == "tpu" else "scatter"
    return method


def _two_taps(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resizing along one axis as two neighbouring taps per output position.

    Returns start (out,) and weights (out, T): output i = sum_t weights[i, t] * input[start[i] + t],
    T = 1 when no output mixes two inputs (same size), else 2 (start + 1 may be ``in_size``: the
    caller pads one zero there, with weight 0).
    """
    if in_size == out_size:
        return np.arange(out_size), np.ones((out_size, 1))
    matrix = interpolation_matrix(in_size, out_size, "bilinear", align_corners)
    rows = np.arange(out_size)
    start = np.argmax(matrix != 0, axis=1)
    padded = np.pad(matrix, ((0, 0), (0, 1)))
    weights = np.stack([padded[rows, start], padded[rows, start + 1]], axis=1)
    rebuilt = _axis_matrix(start, weights, in_size + 1)
    assert np.array_equal(rebuilt[:, :in_size], matrix), "bilinear rows span two neighbours"
    return start, weights


def _class_statistics(
    memory: Array,
    features: Array,
    labels: Array,
    strategy: str,
    ignore_label: int,
    align_corners: bool,
) -> dict[str, Array]:
    """The sums over pixels that the update needs: pixel count and feature sum per class, and
    for ``cosine_similarity`` the dissimilarity weight and weighted feature sum per memory slot.

    Each label pixel's feature is a bilinear mix of (up to) four neighbouring low-resolution
    features, the corners of its cell. Everything the update asks of it follows from
    low-resolution quantities, so the (N, H, W, C) label-resolution map (1 GiB per 512x1024
    crop with 512 channels) never exists: a per-class sum of mixes is the sum of corner
    features weighted by how much of each class's pixels they feed (pixel weights summed into
    (corner, class) bins, then one matmul); a pixel's dot with a memory vector mixes the
    corners' dots; its squared norm is a quadratic form in the corners' Gram matrix. Same sums
    as mixing first, up to float rounding. :func:`memory_sums_method` picks how the per-pixel
    sums and lookups run: scatters and gathers, or matmuls.
    """
    num_classes, num_feats, channels = memory.shape
    batch, in_h, in_w, _ = features.shape
    out_h, out_w = labels.shape[1:3]
    dtype = memory.dtype
    dense = memory_sums_method() == "matmul"
    row_start, row_weights = _two_taps(in_h, out_h, align_corners)
    col_start, col_weights = _two_taps(in_w, out_w, align_corners)
    row_taps, col_taps = row_weights.shape[1], col_weights.shape[1]
    grid_h, grid_w = in_h + row_taps - 1, in_w + col_taps - 1  # one zero row/column past the end
    grid = jnp.pad(features, ((0, 0), (0, row_taps - 1), (0, col_taps - 1), (0, 0)))
    # Per label pixel (static): its cell's top-left corner on the grid and each corner's weight.
    cell = (row_start[:, None] * grid_w + col_start[None, :]).reshape(-1)
    corners = [(s, t) for s in range(row_taps) for t in range(col_taps)]
    corner_offset = [s * grid_w + t for s, t in corners]
    corner_weight = [
        jnp.asarray(np.outer(row_weights[:, s], col_weights[:, t]).reshape(-1), dtype)
        for s, t in corners
    ]
    if dense:
        at_cells = functools.partial(
            _at_cells_dense,
            rows=jnp.asarray(_axis_matrix(row_start, np.ones((out_h, 1)), grid_h), dtype),
            cols=jnp.asarray(_axis_matrix(col_start, np.ones((out_w, 1)), grid_w), dtype),
        )
    else:
        at_cells = functools.partial(jnp.take, indices=cell, axis=1)

    labels = labels.reshape(batch, -1)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    # Invalid pixels go to an extra segment K that is dropped.
    segment = jnp.where(valid, labels, num_classes)
    if strategy == "cosine_similarity":
        dissimilarity, slot_segment = _dissimilarity(
            memory, grid, labels, valid, cell, corner_offset, corner_weight, at_cells
        )
    if dense:
        # The bins as a product: (grid rows, label rows) weights . one-hot columns per pixel .
        # (label columns, grid columns) weights, the columns being classes, then memory slots.
        one_hot = [(segment, jnp.ones((), dtype), num_classes)]
        if strategy == "cosine_similarity":
            one_hot.append((slot_segment, dissimilarity, num_classes * num_feats))
        values = jnp.concatenate(
            [
                jnp.where(ids[..., None] == jnp.arange(count), value[..., None], 0).astype(dtype)
                for ids, value, count in one_hot
            ],
            axis=-1,
        ).reshape(batch, out_h, out_w, -1)
        cell_sums = jnp.einsum(
            "ra,nrcj,cb->nabj",
            jnp.asarray(_axis_matrix(row_start, row_weights, grid_h), dtype),
            values,
            jnp.asarray(_axis_matrix(col_start, col_weights, grid_w), dtype),
            precision="highest",
        )
        sums = jnp.einsum("nabj,nabc->jc", cell_sums, grid, precision="highest")
        # Each pixel's bilinear weights sum to 1, so its cells' sums add up to its own value.
        totals = jnp.sum(cell_sums, axis=(0, 1, 2))
        stats = {"count": totals[:num_classes], "sum": sums[:num_classes]}
        if strategy == "cosine_similarity":
            stats["weight"] = totals[num_classes:]
            stats["weighted"] = sums[num_classes:]
        return stats
    stats = {"count": _segment_totals(valid.astype(jnp.int32), segment, num_classes).astype(dtype)}
    if strategy == "cosine_similarity":
        stats["weight"] = _segment_totals(dissimilarity, slot_segment, num_classes * num_feats)
    # Bins of the corner scatter: (image, grid position, column); columns are the classes (sum)
    # and, for cosine_similarity, then the memory slots (weighted sum), each with a dropped one.
    sum_columns = num_classes + 1
    columns = [(segment, jnp.broadcast_to(jnp.asarray(1.0, dtype), segment.shape))]
    num_columns = sum_columns
    if strategy == "cosine_similarity":
        columns.append((sum_columns + slot_segment, dissimilarity))
        num_columns += num_classes * num_feats + 1
    bins, values = [], []
    for offset, weight in zip(corner_offset, corner_weight, strict=True):
        for column, value in columns:
            bins.append((cell[None, :] + offset) * num_columns + column)
            values.append(weight[None, :] * value)
    # Stacked per pixel, so that each image's entries stay together (concatenating the corners'
    # lists broke the batch's sharding); only the (columns, C) sums below are all-reduced.
    corner_sums = _sums_per_image(
        jnp.stack(values, -1).reshape(batch, -1),
        jnp.stack(bins, -1).reshape(batch, -1),
        grid_h * grid_w * num_columns,
    )
    sums = jnp.einsum(
        "nqs,nqc->sc",
        corner_sums.reshape(batch, grid_h * grid_w, num_columns),
        grid.reshape(batch, grid_h * grid_w, channels),
        precision="highest",
    )
    stats["sum"] = sums[:num_classes]
    if strategy == "cosine_similarity":
        stats["weighted"] = sums[sum_columns : sum_columns + num_classes * num_feats]
    return stats


def _axis_matrix(start: np.ndarray, weights: np.ndarray, grid_size: int) -> np.ndarray:
    """(out, grid_size) float64: row i holds ``weights[i, t]`` at column ``start[i] + t`` (the
    matrix of :func:`_two_taps`' taps)."""
    matrix = np.zeros((len(start), grid_size))
    for tap in range(weights.shape[1]):
        matrix[np.arange(len(start)), start + tap] += weights[:, tap]
    return matrix


def _at_cells_dense(values: Array, *, rows: Array, cols: Array) -> Array:
    """values (N, gh * gw, ...) at each label pixel's cell, (N, H * W, ...), as products with
    the one-hot (H, gh) and (W, gw) matrices ``rows`` and ``cols``: exact copies."""
    batch, grid_h, grid_w = values.shape[0], rows.shape[1], cols.shape[1]
    grid = values.reshape(batch, grid_h, grid_w, -1)
    picked = jnp.einsum("ra,nabu,cb->nrcu", rows, grid, cols, precision="highest")
    return picked.reshape(batch, rows.shape[0] * cols.shape[0], *values.shape[2:])


def _segment_totals(values: Array, segments: Array, num_segments: int) -> Array:
    """values (N, P) summed per segment id (N, P) over the batch, ids >= ``num_segments``
    dropped: (num_segments,)."""
    return _sums_per_image(values, segments, num_segments + 1).sum(axis=0)[:num_segments]


def _sums_per_image(values: Array, segments: Array, num_segments: int) -> Array:
    """values (N, P) summed per segment id (N, P), image by image: (N, num_segments). With the
    batch sharded over devices, each device sums its own images; only what the caller reduces
    over the batch afterwards is all-reduced."""
    return jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=num_segments))(
        values, segments
    )


def _dissimilarity(
    memory: Array,
    grid: Array,
    labels: Array,
    valid: Array,
    cell: np.ndarray,
    corner_offset: list[int],
    corner_weight: list[Array],
    at_cells: Any,
) -> tuple[Array, Array]:
    """Each label pixel's 1 - cosine to its memory slot (0 where invalid) and that slot's index
    (K * F where invalid), both (N, P); for F > 1 the slot is the class's most similar one.

    grid (N, gh, gw, C) holds the low-resolution features (zero-padded); cell (P,) each pixel's
    top-left corner on it; corner_weight its bilinear weights, per corner."""
    num_classes, num_feats, channels = memory.shape
    batch, grid_h, grid_w, _ = grid.shape
    slots = memory.reshape(num_classes * num_feats, channels)
    flat = grid.reshape(batch, grid_h * grid_w, channels)
    safe_labels = jnp.where(valid, labels, 0)
    # Dots of every grid feature with every slot, then each pixel's mix of its corners' dots
    # with its own class's slots: (N, P, F).
    slot_dots = jnp.einsum("nqc,kc->nqk", flat, slots, precision="highest").reshape(batch, -1)
    own = safe_labels[..., None] * num_feats + jnp.arange(num_feats)  # (N, P, F)
    dots = 0.0
    for offset, weight in zip(corner_offset, corner_weight, strict=True):
        index = (cell[None, :, None] + offset) * (num_classes * num_feats) + own
        corner_dots = jnp.take_along_axis(slot_dots, index.reshape(batch, -1), axis=1)
        dots = dots + weight[None, :, None] * corner_dots.reshape(own.shape)
    # Squared norms: the corners' Gram matrix (each pair's dots, on the grid) in the weights.
    pairs, factors = [], []
    for u, (offset_u, weight_u) in enumerate(zip(corner_offset, corner_weight, strict=True)):
        for v in range(u, len(corner_offset)):
            offset_v, weight_v = corner_offset[v], corner_weight[v]
            pairs.append(
                jnp.einsum(
                    "nqc,nqc->nq",
                    _shifted(flat, offset_u),
                    _shifted(flat, offset_v),
                    precision="highest",
                )
            )
            factors.append((1.0 if u == v else 2.0) * weight_u * weight_v)
    pair_at_pixels = at_cells(jnp.stack(pairs, axis=-1))  # (N, P, pairs)
    squares = 0.0
    for index, factor in enumerate(factors):
        squares = squares + factor[None, :] * pair_at_pixels[..., index]
    norms = jnp.sqrt(jnp.maximum(squares, 0.0))
    slot_norms = jnp.linalg.norm(slots, axis=-1)[own]  # (N, P, F)
    slot = jnp.zeros(labels.shape, jnp.int32)
    if num_feats > 1:
        relation = dots / (
            jnp.maximum(norms, _NORMALIZE_EPS)[..., None] * jnp.maximum(slot_norms, _NORMALIZE_EPS)
        )
        slot = jnp.argmax(relation, axis=-1)
    own_dot = jnp.take_along_axis(dots, slot[..., None], axis=-1)[..., 0]
    own_norm = jnp.take_along_axis(slot_norms, slot[..., None], axis=-1)[..., 0]
    cosine = own_dot / (jnp.maximum(norms, _COSINE_EPS) * jnp.maximum(own_norm, _COSINE_EPS))
    dissimilarity = jnp.where(valid, 1.0 - cosine, 0.0)
    slot_segment = jnp.where(valid, safe_labels * num_feats + slot, num_classes * num_feats)
    return dissimilarity, slot_segment


def _shifted(flat: Array, offset: int) -> Array:
    """flat (N, Q, C) moved ``offset`` positions earlier along Q, zeros past the end."""
    if offset == 0:
        return flat
    return jnp.pad(flat[:, offset:], ((0, 0), (0, offset), (0, 0)))


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
