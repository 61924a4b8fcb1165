"""The training loop: epochs of jitted steps, logging, divergence check."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mcibi_jax.config import ConfigError
from mcibi_jax.data.experiment_data import TrainingData
from mcibi_jax.host_memory import release_free_host_memory
from mcibi_jax.models.segmentor import MCIBI
from mcibi_jax.progress import ProgressBar, format_duration
from mcibi_jax.sharding import replicate
from mcibi_jax.train.checkpoints import TrainCheckpoints
from mcibi_jax.train.interrupt import StopRequests, TrainingInterrupted
from mcibi_jax.train.optimizer import optimizer_from_config
from mcibi_jax.train.state import TrainState, create_train_state, init_variables
from mcibi_jax.train.step import make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped and nothing was saved."""


def train(
    model: MCIBI,
    config: Mapping[str, Any],
    data: TrainingData,
    mesh: Mesh,
    *,
    log: Callable[[str], None] = print,
    checkpoints: TrainCheckpoints | None = None,
    initial_variables: Mapping[str, Any] | None = None,
    record: Callable[[int, dict[str, float]], None] | None = None,
    after_epoch: Callable[[int, TrainState], None] | None = None,
    progress: ProgressBar | None = None,
    stop: StopRequests | None = None,
    on_start: Callable[[], None] | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Trains ``model`` from scratch as ``config.train`` says (``train.num_replicas``: the
    reference's GPU count whose per-GPU losses and memory updates to reproduce) over ``mesh``.

    ``data.epoch(epoch, skip)`` (epoch from 1) yields the ``data.steps_per_epoch`` global
    batches of that epoch after the first ``skip`` (already trained when resuming from a
    checkpoint saved inside the epoch). Logs every ``config.train.log_every`` steps (loss
    averaged since the last line, lr, images/s, ETA). Returns the final state and the logged
    history. Raises :class:`TrainingDiverged` as soon as a step's loss is not finite.

    With ``checkpoints``, training resumes from the newest one (``data.restore`` gets the input
    pipeline's saved position) and saves the state and ``data.state()`` at the end of every
    ``train.checkpoint_every`` epochs and of the last one; a diverged run saves nothing.
    ``initial_variables`` (e.g. ported released weights) replace the random initialisation.
    ``record(step, scalars)`` receives every logged line's values (losses, lr, memory momentum,
    images/s, epoch). ``on_start()`` runs once the state is initialised or resumed, before the
    first step.
    ``train.ema_decay`` > 0 keeps an exponential moving average of the variables in the state
    (``state.ema_params``; ``state.export_variables`` are then the averaged ones).
    ``after_epoch(epoch, state)`` runs after each epoch (and its checkpoint), e.g. an evaluation.
    ``progress`` (a bar over all steps, on interactive terminals) advances every step; ``log``
    should then print above it (``progress.interleave``).
    ``stop`` (signals, see :mod:`mcibi_jax.train.interrupt`): at the step all hosts agree on,
    training saves a checkpoint (waiting until it is on disk) and raises
    :class:`TrainingInterrupted`.
    """
    progress = progress or ProgressBar(0, enabled=False)
    train_config = config["train"]
    model_config = (
        config["model"].to_dict() if hasattr(config["model"], "to_dict") else dict(config["model"])
    )
    ignore_label = int(config["dataset"]["ignore_label"])
    num_epochs, steps_per_epoch = int(train_config["num_epochs"]), data.steps_per_epoch
    total_steps = num_epochs * steps_per_epoch
    log_every = max(1, int(train_config["log_every"]))
    seed = int(train_config["seed"])

    # An 'rbg' key for the initialisation: XLA compiles it in a fraction of threefry's time on CPU.
    if initial_variables is not None:
        variables = dict(initial_variables)
    else:
        variables = init_variables(model, jax.random.key(seed, impl="rbg"), data.image_size)
    tx, schedule = optimizer_from_config(variables["params"], train_config, steps_per_epoch)
    ema_decay = float(train_config["ema_decay"])
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"train.ema_decay={ema_decay} must be in [0, 1) (0 = off)")
    state = replicate(create_train_state(variables, tx, ema=ema_decay > 0), mesh)
    checkpoint_every = max(1, int(train_config["checkpoint_every"]))
    start_epoch = 1
    if checkpoints is not None:
        restored = checkpoints.restore_latest(state)
        if restored is not None:
            state, saved_data = restored
            data.restore(saved_data)
            start_epoch = int(state.step) // steps_per_epoch + 1
            log(
                f"resuming from {checkpoints.directory} at step {int(state.step)} (epoch {start_epoch})"
            )
    if int(state.step) > total_steps:
        raise ConfigError(
            f"the checkpoint in {checkpoints.directory} is at step {int(state.step)}, past this "
            f"config's {total_steps} steps ({num_epochs} epochs x {steps_per_epoch} steps of batch "
            f"{train_config['batch_size']}): was it trained with another train.batch_size or "
            "train.num_epochs? Resume with the config it was trained with, or use a new --workdir."
        )
    progress.set_position(int(state.step))
    dropout_key = replicate(jax.random.key(seed + 1), mesh)
    num_replicas = int(train_config["num_replicas"])
    if int(train_config["batch_size"]) % num_replicas:
        raise ValueError(
            f"train.batch_size={train_config['batch_size']} does not split into {num_replicas} replicas"
        )
    step_fn = make_train_step(
        model,
        model_config,
        tx,
        schedule,
        steps_per_epoch,
        mesh,
        ignore_label,
        num_replicas,
        ema_decay=ema_decay,
    )
    if ema_decay > 0:
        log(
            f"keeping an EMA of the weights (decay {ema_decay}, i.e. the reference's momentum {1 - ema_decay:.6g})"
        )
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    log(
        f"training {num_params:,} parameters for {num_epochs} epochs x {steps_per_epoch} steps "
        f"(batch {train_config['batch_size']}) on {mesh.size} {jax.devices()[0].platform} device(s)"
    )

    history: list[dict[str, float]] = []
    window: list[dict[str, float]] = []
    pending = None  # the previous step's metrics, read one step late to keep the device busy
    start = window_start = time.perf_counter()
    compiled_at, compiled = start, False
    step = window_first_step = int(state.step)

    def check(metrics: dict[str, Any], at_step: int) -> dict[str, float]:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(values["loss"]):
            parts = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k.startswith("loss_"))
            raise TrainingDiverged(
                f"training diverged: the loss is {values['loss']} at step {at_step} (epoch {int(values['epoch'])}, "
                f"lr {values['lr']:.4g}; {parts}). Stopped; no checkpoint was written. Lower train.optimizer.lr?"
            )
        return values

    if on_start is not None:
        on_start()
    first_step = step + 1
    if step >= total_steps:
        log(f"already trained: the checkpoint is at step {step} of {total_steps}")
    for epoch in range(start_epoch, num_epochs + 1):
        # trained before the checkpoint we resumed from
        skip = max(0, step - (epoch - 1) * steps_per_epoch)
        for batch in data.epoch(epoch, skip):
            if step >= total_steps:
                break
            state, metrics = step_fn(state, batch, dropout_key)
            step += 1
            progress.update(1, epoch=f"{epoch}/{num_epochs}")
            if stop is not None and stop.reached(step):
                if pending is not None:
                    check(*pending)
                check(metrics, step)  # a diverged state is never saved
                _stop_and_save(state, step, total_steps, checkpoints, data, stop, log)
            if pending is not None:
                window.append(check(*pending))
            pending = (metrics, step)
            if not compiled:  # the first step of this run
                compiled = True
                jax.block_until_ready(metrics["loss"])
                compiled_at = window_start = time.perf_counter()
                window_first_step = step  # the compilation does not count toward the speed
                log(f"step {step} compiled and ran in {compiled_at - start:.1f}s")
                release_free_host_memory()  # what the compiler freed
                progress.restart_clock()
            if step % log_every == 0 or step == total_steps:
                window.append(check(*pending))
                pending = None
                now = time.perf_counter()
                rate = (
                    (step - window_first_step)
                    * int(train_config["batch_size"])
                    / max(now - window_start, 1e-9)
                )
                per_step = (now - compiled_at) / max(step - first_step, 1)
                entry = {
                    k: float(np.mean([w[k] for w in window]))
                    for k in window[0]
                    if k.startswith("loss")
                }
                entry.update(
                    step=step,
                    epoch=epoch,
                    lr=window[-1]["lr"],
                    memory_momentum=window[-1]["memory_momentum"],
                    images_per_s=rate,
                )
                history.append(entry)
                progress.update(0, loss=entry["loss"], lr=entry["lr"])
                if record is not None:
                    record(step, {k: v for k, v in entry.items() if k != "step"})
                losses = " ".join(f"{k}={v:.4f}" for k, v in entry.items() if k.startswith("loss_"))
                log(
                    f"step {step}/{total_steps} epoch {epoch}/{num_epochs} loss {entry['loss']:.4f} ({losses}) "
                    f"lr {entry['lr']:.3e} memory momentum {entry['memory_momentum']:.3e} {rate:.1f} img/s ETA {format_duration(per_step * (total_steps - step))}"
                )
                window, window_start, window_first_step = [], now, step
        if step < epoch * steps_per_epoch and step < total_steps:
            raise ValueError(
                f"epoch {epoch} gave {step - (epoch - 1) * steps_per_epoch} batches, expected {steps_per_epoch}"
            )
        saving = checkpoints is not None and (epoch % checkpoint_every == 0 or epoch == num_epochs)
        if (saving or after_epoch is not None) and pending is not None:
            window.append(check(*pending))
            pending = None
        paused = time.perf_counter()
        if saving:
            checkpoints.save(state, data.state())
        if after_epoch is not None:
            after_epoch(epoch, state)
        # Saving and evaluating are not training steps: keep them out of img/s and the ETA.
        paused = time.perf_counter() - paused
        window_start, compiled_at = window_start + paused, compiled_at + paused
    if pending is not None:
        check(*pending)
    log(f"trained {step} steps in {format_duration(time.perf_counter() - start)}")
    return state, history


def _stop_and_save(
    state: TrainState,
    step: int,
    total_steps: int,
    checkpoints: TrainCheckpoints | None,
    data: TrainingData,
    stop: StopRequests,
    log: Callable[[str], None],
) -> None:
    """Saves the state at ``step``, waits until it is on disk and raises TrainingInterrupted."""
    path = None
    if checkpoints is not None:
        log(f"saving step {step} before stopping ({stop.signal_name})")
        path = checkpoints.save(state, data.state())
        checkpoints.wait()
    raise TrainingInterrupted(step, total_steps, path, stop.signal_name or "a signal")
