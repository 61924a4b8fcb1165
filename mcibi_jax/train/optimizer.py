"""SGD with the reference's parameter groups and its poly learning-rate schedule (optax).

The reference trains with ``torch.optim.SGD(momentum=0.9, weight_decay=wd)``: the L2 term
``wd * param`` is added to the gradient of every parameter *before* momentum, and the update
is ``-lr * buffer``. Parameter rules (``config.train.optimizer.param_rules``, e.g.
``{"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 1.0}}``) give a parameter whose
PyTorch-style name contains the rule key (the longest matching key wins) a multiplied lr and
weight decay. The lr follows, per iteration and without warm-up,

    lr_t = (lr - min_lr) * (1 - t / T) ** power + min_lr,   t = 0, 1, ..., T - 1,

with T = num_epochs * steps_per_epoch and min_lr defaulting to lr / 100.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

Array = jax.Array
Schedule = Callable[[Array | int], Array]

_TORCH_LEAF = {"kernel": "weight", "scale": "weight"}


def poly_schedule(lr: float, total_steps: int, *, power: float = 0.9, min_lr: float | None = None) -> Schedule:
    """The lr of update ``t`` (0-based): the reference's ``PolyScheduler`` without warm-up."""
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one step, got total_steps={total_steps}")
    min_lr = lr * 0.01 if min_lr is None else min_lr

    def schedule(step: Array | int) -> Array:
        remaining = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
        return (lr - min_lr) * remaining**power + min_lr

    return schedule


def schedule_from_config(train_config: Mapping[str, Any], steps_per_epoch: int) -> Schedule:
    """The (un-multiplied) lr schedule of ``config.train``."""
    sched = train_config["schedule"]
    if sched.get("name", "poly") != "poly":
        raise ValueError(f"unsupported lr schedule {sched['name']!r}; only 'poly' is implemented")
    lr = float(train_config["optimizer"]["lr"])
    min_lr = sched.get("min_lr")
    return poly_schedule(
        lr, int(train_config["num_epochs"]) * steps_per_epoch, power=float(sched.get("power", 0.9)),
        min_lr=None if min_lr is None else float(min_lr),
    )


def torch_style_name(path: tuple[str, ...]) -> str:
    """``("backbone_net", "layer1", "0", "conv1", "kernel")`` -> ``"backbone_net.layer1.0.conv1.weight"``."""
    *modules, leaf = path
    return ".".join([*modules, _TORCH_LEAF.get(leaf, leaf)])


def matching_rule(name: str, rule_keys: list[str] | tuple[str, ...]) -> str | None:
    """The rule whose key is a substring of ``name``: the longest, ties alphabetically (as the reference)."""
    for key in sorted(sorted(rule_keys), key=len, reverse=True):
        if key in name:
            return key
    return None


def group_multipliers(params: Any, param_rules: Mapping[str, Mapping[str, float]]) -> tuple[Any, Any]:
    """Per-parameter (lr multiplier, weight-decay multiplier) trees with the structure of ``params``."""
    rules = {k: dict(v) for k, v in dict(param_rules or {}).items()}
    for key, rule in rules.items():
        unknown = set(rule) - {"lr_multiplier", "wd_multiplier"}
        if unknown:
            raise ValueError(f"param rule {key!r}: unsupported options {sorted(unknown)}")
    flat = traverse_util.flatten_dict(params)
    lr_mult, wd_mult = {}, {}
    for path in flat:
        key = matching_rule(torch_style_name(path), list(rules))
        rule = rules.get(key, {}) if key is not None else {}
        lr_mult[path] = float(rule.get("lr_multiplier", 1.0))
        wd_mult[path] = float(rule.get("wd_multiplier", 1.0))
    return traverse_util.unflatten_dict(lr_mult), traverse_util.unflatten_dict(wd_mult)


def add_l2_to_gradient(weight_decay: Any) -> optax.GradientTransformation:
    """g <- g + wd * p, with a per-parameter ``weight_decay`` tree (torch SGD's weight_decay)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_l2_to_gradient needs the params")
        return jax.tree_util.tree_map(lambda g, p, wd: g + wd * p, updates, params, weight_decay), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_multiplied_lr(schedule: Schedule, lr_multiplier: Any) -> optax.GradientTransformation:
    """u <- -lr_t * multiplier * u, lr_t = schedule(number of updates so far)."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        lr = schedule(state.count)
        updates = jax.tree_util.tree_map(lambda u, m: -(lr * m) * u, updates, lr_multiplier)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def sgd(
    params: Any, schedule: Schedule, *, momentum: float = 0.9, weight_decay: float = 0.0,
    param_rules: Mapping[str, Mapping[str, float]] | None = None,
) -> optax.GradientTransformation:
    """torch SGD (dampening 0, no Nesterov) with per-group lr / weight-decay multipliers."""
    lr_mult, wd_mult = group_multipliers(params, param_rules or {})
    decay = jax.tree_util.tree_map(lambda m: weight_decay * m, wd_mult)
    chain = []
    if weight_decay:
        chain.append(add_l2_to_gradient(decay))
    if momentum:
        chain.append(optax.trace(decay=momentum, nesterov=False))
    chain.append(scale_by_multiplied_lr(schedule, lr_mult))
    return optax.chain(*chain)


def optimizer_from_config(params: Any, train_config: Mapping[str, Any], steps_per_epoch: int) -> tuple[optax.GradientTransformation, Schedule]:
    """(optimizer, un-multiplied lr schedule) described by ``config.train``."""
    opt = train_config["optimizer"]
    if opt.get("name", "sgd").lower() != "sgd":
        raise ValueError(f"unsupported optimizer {opt['name']!r}; only 'sgd' is implemented")
    schedule = schedule_from_config(train_config, steps_per_epoch)
    rules = opt.get("param_rules") or {}
    rules = rules.to_dict() if hasattr(rules, "to_dict") else dict(rules)
    tx = sgd(params, schedule, momentum=float(opt.get("momentum", 0.9)), weight_decay=float(opt.get("weight_decay", 0.0)),
             param_rules=rules)
    return tx, schedule
