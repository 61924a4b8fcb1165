"""The training objective of one step: losses, new BatchNorm statistics and new memory.

A pure function of (params, state, batch), so that the train step can take its gradient
and jit/shard it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mcibi_jax.models.memory import memory_momentum
from mcibi_jax.models.segmentor import MCIBI
from mcibi_jax.train.losses import memory_loss, segmentation_losses

Array = jax.Array


def memory_of(variables: Mapping[str, Any]) -> Array:
    """The (K, F, C) memory array inside a variables dict."""
    return variables["memory"]["memory_module"]["memory"]


def with_memory(memory_collection: Mapping[str, Any], memory: Array) -> dict:
    return {
        **memory_collection,
        "memory_module": {**memory_collection["memory_module"], "memory": memory},
    }


def memory_momentum_of(model: MCIBI, learning_rate: Array | float) -> Array | float:
    """The memory update's momentum at ``learning_rate`` (``model.head.memory_update`` settings)."""
    update = model.head.memory_update
    return memory_momentum(
        learning_rate,
        base_momentum=update.base_momentum,
        base_lr=update.base_lr,
        adjust_by_learning_rate=update.adjust_by_learning_rate,
    )


def loss_and_updates(
    model: MCIBI,
    model_config: Mapping[str, Any],
    params: Any,
    batch_stats: Any,
    memory_collection: Any,
    images: Array,
    labels: Array,
    *,
    learning_rate: Array | float,
    epoch: Array | int,
    dropout_rng: Array | None = None,
    ignore_label: int = -100,
    num_replicas: int = 1,
) -> tuple[Array, tuple[dict[str, Array], Any, Any]]:
    """Total loss and (logged losses, new batch_stats, new memory collection).

    images (N, H, W, 3) normalised, labels (N, H, W) int with ``ignore_label``. Follows the
    reference's order: forward (BatchNorm on batch statistics), memory update with the
    upsampled memory-read features, the weighted segmentation losses and, after the first
    epoch where enabled, the memory loss on the *updated* memory (which passes the stage-2
    decoder in training mode once more, so its BatchNorm statistics move twice).

    ``num_replicas`` R reproduces the reference trained on R data-parallel GPUs, each holding
    N / R consecutive images: per-replica loss means (and so gradients) averaged, per-replica
    memory updates averaged, synchronised BatchNorm over the whole batch. It depends only on
    R, not on how many devices run this function.
    """
    head = model.head
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    variables = {"params": params, "batch_stats": batch_stats, "memory": memory_collection}
    momentum = memory_momentum_of(model, learning_rate)
    outputs, mutated = model.apply(
        variables,
        images,
        train=True,
        labels=labels,
        memory_momentum=momentum,
        num_replicas=num_replicas,
        rngs=rngs,
        mutable=["batch_stats"],
    )
    new_batch_stats = mutated["batch_stats"]
    replica_memories = outputs["replica_memories"]
    losses = segmentation_losses(
        outputs,
        labels,
        model_config["loss_weights"],
        ignore_label=ignore_label,
        align_corners=model.align_corners,
        num_replicas=num_replicas,
    )

    if head.use_memory_loss:
        memory_logits, mutated = model.apply(
            {"params": params, "batch_stats": new_batch_stats, "memory": memory_collection},
            replica_memories,
            train=True,
            rngs=rngs,
            mutable=["batch_stats"],
            method=MCIBI.classify_memory,
        )
        after_first_epoch = jnp.asarray(epoch) > 1
        value = memory_loss(
            memory_logits, replica_memories.shape[2], head.memory_loss_weight, num_replicas
        )
        losses["loss_memory"] = jnp.where(after_first_epoch, value, 0.0)
        new_batch_stats = jax.tree_util.tree_map(
            lambda after, before: jnp.where(after_first_epoch, after, before),
            mutated["batch_stats"],
            new_batch_stats,
        )
    total = sum(losses.values())
    new_memory = jnp.mean(replica_memories, axis=0)  # the reference's all-reduce of the memory
    return total, (losses, new_batch_stats, with_memory(memory_collection, new_memory))
