"""SGD with the reference's parameter groups and its poly learning-rate schedule (optax).

The reference trains with ``torch.optim.SGD(momentum=0.9, weight_decay=wd)``: the L2 term
``wd * param`` is added to the gradient of every parameter *before* momentum, and the update
is ``-lr * buffer``. Parameter rules (``config.train.optimizer.param_rules``, e.g.
``{"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 1.0}}``) put a parameter whose
PyTorch-style name contains the rule key (the longest matching key wins) in that rule's group,
with a multiplied lr and weight decay; each group is its own optax SGD (``optax.partition``).
The lr follows, per iteration and without warm-up,

    lr_t = (lr - min_lr) * (1 - t / T) ** power + min_lr,   t = 0, 1, ..., T - 1,

with T = num_epochs * steps_per_epoch and min_lr defaulting to lr / 100 (``min_lr`` from t = T on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from flax import traverse_util

Array = jax.Array
Schedule = Callable[[Array | int], Array]

_TORCH_LEAF = {"kernel": "weight", "scale": "weight"}
# The group of the parameters no rule matches. No rule can take this label from them: a rule
# keyed "" would match every name, leaving this group empty.
UNMATCHED = ""


def poly_schedule(
    lr: float, total_steps: int, *, power: float = 0.9, min_lr: float | None = None
) -> Schedule:
    """The lr of update ``t`` (0-based): the reference's ``PolyScheduler`` without warm-up."""
    if total_steps < 1:
        raise ValueError(f"the schedule needs at least one step, got total_steps={total_steps}")
    min_lr = lr * 0.01 if min_lr is None else min_lr
    decay = optax.polynomial_schedule(
        init_value=lr, end_value=min_lr, power=power, transition_steps=total_steps
    )
    # From step T on, min_lr itself: jitted, decay's 1 - t / T at t = T can come out a hair off 0
    # (XLA fuses it into a multiply-add), leaving a tiny extra lr, or NaN from the power.
    return optax.join_schedules([decay, optax.constant_schedule(min_lr)], boundaries=[total_steps])


def schedule_from_config(train_config: Mapping[str, Any], steps_per_epoch: int) -> Schedule:
    """The (un-multiplied) lr schedule of ``config.train``."""
    sched = train_config["schedule"]
    if sched["name"] != "poly":
        raise ValueError(f"unsupported lr schedule {sched['name']!r}; only 'poly' is implemented")
    lr = float(train_config["optimizer"]["lr"])
    min_lr = sched["min_lr"]
    return poly_schedule(
        lr,
        int(train_config["num_epochs"]) * steps_per_epoch,
        power=float(sched["power"]),
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


def _checked_rules(
    param_rules: Mapping[str, Mapping[str, float]] | None,
) -> dict[str, dict[str, float]]:
    rules = {k: dict(v) for k, v in dict(param_rules or {}).items()}
    for key, rule in rules.items():
        unknown = set(rule) - {"lr_multiplier", "wd_multiplier"}
        if unknown:
            raise ValueError(f"param rule {key!r}: unsupported options {sorted(unknown)}")
    return rules


def group_labels(params: Any, param_rules: Mapping[str, Mapping[str, float]] | None) -> Any:
    """Each parameter's group, shaped like ``params``: its rule's key, or :data:`UNMATCHED`."""
    keys = list(_checked_rules(param_rules))
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {path: matching_rule(torch_style_name(path), keys) or UNMATCHED for path in flat}
    )


def sgd(
    params: Any,
    schedule: Schedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    param_rules: Mapping[str, Mapping[str, float]] | None = None,
) -> optax.GradientTransformation:
    """torch SGD (dampening 0, no Nesterov) with per-group lr / weight-decay multipliers."""
    rules = _checked_rules(param_rules)
    labels = group_labels(params, rules)

    def group_sgd(label: str) -> optax.GradientTransformation:
        rule = rules.get(label, {})
        lr_multiplier = float(rule.get("lr_multiplier", 1.0))
        return optax.chain(
            optax.add_decayed_weights(weight_decay * float(rule.get("wd_multiplier", 1.0))),
            optax.sgd(lambda step: schedule(step) * lr_multiplier, momentum=momentum or None),
        )

    return optax.partition(
        {label: group_sgd(label) for label in sorted(set(jax.tree.leaves(labels)))}, labels
    )


def optimizer_from_config(
    params: Any, train_config: Mapping[str, Any], steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """(optimizer, un-multiplied lr schedule) described by ``config.train``."""
    opt = train_config["optimizer"]
    if opt["name"].lower() != "sgd":
        raise ValueError(f"unsupported optimizer {opt['name']!r}; only 'sgd' is implemented")
    schedule = schedule_from_config(train_config, steps_per_epoch)
    rules = opt["param_rules"]
    rules = rules.to_dict() if hasattr(rules, "to_dict") else dict(rules)
    tx = sgd(
        params,
        schedule,
        momentum=float(opt["momentum"]),
        weight_decay=float(opt["weight_decay"]),
        param_rules=rules,
    )
    return tx, schedule
