"""One training step (pure), and its jitted, data-parallel form."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mcibi_jax.models.segmentor import MCIBI
from mcibi_jax.sharding import batch_sharding, replicated_sharding
from mcibi_jax.train.objective import loss_and_updates, memory_momentum_of
from mcibi_jax.train.optimizer import Schedule
from mcibi_jax.train.state import TrainState, ema_update

Array = jax.Array
Batch = Mapping[str, Array]  # {"images": (N, H, W, 3) float32, "labels": (N, H, W) int32}
StepFn = Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]


def epoch_of(step: Array | int, steps_per_epoch: int) -> Array:
    """1-based epoch of the update that follows ``step`` updates (the reference counts from 1)."""
    return jnp.asarray(step) // steps_per_epoch + 1


def train_step(
    state: TrainState,
    batch: Batch,
    rng: Array,
    *,
    model: MCIBI,
    model_config: Mapping[str, Any],
    tx: optax.GradientTransformation,
    schedule: Schedule,
    steps_per_epoch: int,
    ignore_label: int = -100,
    num_replicas: int = 1,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict[str, Array]]:
    """One SGD update: gradients of the MCIBI objective, new BatchNorm statistics and memory.

    The memory momentum follows the un-multiplied schedule lr of this update; the memory
    loss joins after the first epoch. ``rng`` is the run's dropout key (folded with the step).
    ``num_replicas``: the reference's number of data-parallel GPUs to reproduce (see
    :func:`mcibi_jax.train.objective.loss_and_updates`), whatever the number of devices.
    ``ema_decay`` > 0: ``state.ema_params`` follows the new variables (:func:`ema_update`).
    Returns the new state and the step's metrics: ``loss`` (total), each logged loss, ``lr``,
    ``memory_momentum``, ``epoch``.
    """
    lr = schedule(state.step)
    epoch = epoch_of(state.step, steps_per_epoch)
    objective = functools.partial(
        loss_and_updates,
        model,
        model_config,
        learning_rate=lr,
        epoch=epoch,
        dropout_rng=jax.random.fold_in(rng, state.step),
        ignore_label=ignore_label,
        num_replicas=num_replicas,
    )
    grad_fn = jax.value_and_grad(
        lambda params: objective(
            params, state.batch_stats, state.memory, batch["images"], batch["labels"]
        ),
        has_aux=True,
    )
    (total, (losses, batch_stats, memory)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        memory=memory,
        opt_state=opt_state,
    )
    if ema_decay > 0 and state.ema_params is not None:
        new_state = new_state.replace(
            ema_params=ema_update(state.ema_params, new_state.variables, ema_decay)
        )
    momentum = jnp.asarray(memory_momentum_of(model, lr), jnp.float32)
    metrics = {"loss": total, "lr": lr, "memory_momentum": momentum, "epoch": epoch, **losses}
    return new_state, metrics


# XLA:CPU's default schedule, made for running independent ops concurrently, computes the
# parameter-only work of the step (transposed kernels for the backward pass, the gradient-free
# part of the SGD update) early in the forward pass and keeps it until it is used: R-50 at
# 2x256x256 needs 1.46 GiB of scratch that way, 0.84 GiB in the memory-minimising order.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def make_train_step(
    model: MCIBI,
    model_config: Mapping[str, Any],
    tx: optax.GradientTransformation,
    schedule: Schedule,
    steps_per_epoch: int,
    mesh: Mesh,
    ignore_label: int = -100,
    num_replicas: int = 1,
    ema_decay: float = 0.0,
) -> StepFn:
    """``train_step`` jitted over ``mesh``: the batch split along 'data', the state replicated.

    XLA partitions the step written for the global batch, so the result does not depend on
    the number of devices: BatchNorm uses global batch statistics (the reference's SyncBN),
    and the reference's per-GPU losses and memory updates follow ``num_replicas``.
    TODO: the per-replica memory updates are computed by the partitioner from the global
    arrays; running each under shard_map on its own shard, then a pmean over 'data' (the
    reference's all_reduce / world_size), would keep that work and its traffic local.
    """
    step = functools.partial(
        train_step,
        model=model,
        model_config=model_config,
        tx=tx,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        ignore_label=ignore_label,
        num_replicas=num_replicas,
        ema_decay=ema_decay,
    )
    state_sharding, data = replicated_sharding(mesh), batch_sharding(mesh)
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    return jax.jit(
        step,
        in_shardings=(state_sharding, data, state_sharding),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=(0,),  # the new state is written into the old one's buffers
        compiler_options=CPU_COMPILER_OPTIONS if on_cpu else None,
    )
