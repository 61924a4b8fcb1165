"""The optimizer follows torch SGD with the reference's parameter groups and poly schedule."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mcibi_jax.config import load_config
from mcibi_jax.train.optimizer import (
    group_multipliers, matching_rule, optimizer_from_config, poly_schedule, sgd, torch_style_name,
)

REPO = Path(__file__).resolve().parents[1]


def test_poly_schedule_hand_computed():
    schedule = poly_schedule(0.01, 10, power=0.9)  # min_lr defaults to lr / 100
    # (0.01 - 1e-4) * (1 - t / 10) ** 0.9 + 1e-4
    expected = {0: 0.01, 5: 0.0099 * 0.5**0.9 + 1e-4, 9: 0.0099 * 0.1**0.9 + 1e-4, 10: 1e-4}
    assert expected[5] == pytest.approx(0.0054053, rel=1e-4)
    assert expected[9] == pytest.approx(0.0013463, rel=1e-4)
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6)
    assert float(schedule(25)) == pytest.approx(1e-4)  # past the end: stays at min_lr, no NaN


def test_poly_schedule_explicit_min_lr():
    schedule = poly_schedule(0.001, 4, power=1.0, min_lr=1e-4)
    np.testing.assert_allclose([float(schedule(t)) for t in range(5)], [1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4], rtol=1e-6)


def test_schedule_from_config_uses_epochs_times_steps():
    config = load_config(REPO / "configs" / "demo.py", ["train.num_epochs=2", "train.optimizer.lr=0.1", "train.schedule.min_lr=0.0"])
    params = {"w": jnp.zeros(3)}
    _, schedule = optimizer_from_config(params, config.train, steps_per_epoch=5)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(5)) == pytest.approx(0.1 * 0.5**0.9, rel=1e-6)
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-9)


def test_torch_style_names():
    assert torch_style_name(("backbone_net", "layer1", "0", "conv1", "kernel")) == "backbone_net.layer1.0.conv1.weight"
    assert torch_style_name(("bottleneck", "1", "scale")) == "bottleneck.1.weight"
    assert torch_style_name(("decoder_stage2", "4", "bias")) == "decoder_stage2.4.bias"
    assert torch_style_name(("backbone_net", "pos_embed")) == "backbone_net.pos_embed"


def test_rule_matching_is_substring_longest_first():
    keys = ["backbone_net", "backbone_net.layer4", "decoder"]
    assert matching_rule("backbone_net.layer4.0.conv1.weight", keys) == "backbone_net.layer4"
    assert matching_rule("backbone_net.layer1.0.conv1.weight", keys) == "backbone_net"
    assert matching_rule("decoder_stage1.0.weight", keys) == "decoder"  # substring, as the reference
    assert matching_rule("bottleneck.0.weight", keys) is None
    assert matching_rule("ab.weight", ["b", "a"]) == "a"  # equal lengths: alphabetical


def test_group_multipliers_cover_every_parameter():
    params = {
        "backbone_net": {"conv1": {"kernel": jnp.ones((3, 3, 1, 1))}, "bn1": {"scale": jnp.ones(1), "bias": jnp.ones(1)}},
        "head": {"kernel": jnp.ones((1, 1))},
    }
    lr, wd = group_multipliers(params, {"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 0.5}})
    assert lr["backbone_net"]["conv1"]["kernel"] == 0.1 and wd["backbone_net"]["conv1"]["kernel"] == 0.5
    # norms and biases are grouped like every other parameter (no exclusions in the reference's default)
    assert lr["backbone_net"]["bn1"]["scale"] == 0.1 and wd["backbone_net"]["bn1"]["bias"] == 0.5
    assert lr["head"]["kernel"] == 1.0 and wd["head"]["kernel"] == 1.0
    with pytest.raises(ValueError, match="unsupported options"):
        group_multipliers(params, {"head": {"lr_mult": 2.0}})


def test_sgd_matches_torch_semantics_by_hand():
    """Two steps of torch SGD(momentum=0.9, weight_decay=wd) per group, written out."""
    params = {"backbone_net": {"w": jnp.array([1.0, -2.0])}, "head": {"w": jnp.array([0.5])}}
    grads = {"backbone_net": {"w": jnp.array([0.3, 0.1])}, "head": {"w": jnp.array([-0.2])}}
    schedule = poly_schedule(0.1, 2, power=0.9, min_lr=0.0)  # lr_0 = 0.1, lr_1 = 0.1 * 0.5 ** 0.9
    tx = sgd(params, schedule, momentum=0.9, weight_decay=0.01,
             param_rules={"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 2.0}})
    state = tx.init(params)
    p = params
    for _ in range(2):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)

    lr0, lr1 = 0.1, 0.1 * 0.5**0.9
    # backbone: lr x 0.1, wd 0.02.  step 0: d = g + wd p; buf = d; p -= lr0 * 0.1 * buf
    w, g = np.array([1.0, -2.0]), np.array([0.3, 0.1])
    buf = g + 0.02 * w                      # [0.32, 0.06]
    w = w - lr0 * 0.1 * buf                 # [0.9968, -2.0006]
    np.testing.assert_allclose(w, [0.9968, -2.0006], rtol=1e-12)
    buf = 0.9 * buf + (g + 0.02 * w)        # step 1: buf = 0.9 buf + d
    w = w - lr1 * 0.1 * buf
    np.testing.assert_allclose(p["backbone_net"]["w"], w, rtol=1e-6)
    # head: lr x 1, wd 0.01
    h, gh = 0.5, -0.2
    buf = gh + 0.01 * h                     # -0.195
    h = h - lr0 * buf                       # 0.5195
    assert h == pytest.approx(0.5195)
    buf = 0.9 * buf + (gh + 0.01 * h)
    h = h - lr1 * buf
    np.testing.assert_allclose(p["head"]["w"], [h], rtol=1e-6)


def test_sgd_without_weight_decay_or_momentum_is_plain_gradient_descent():
    params = {"w": jnp.array([2.0])}
    tx = sgd(params, poly_schedule(0.5, 10, power=1.0, min_lr=0.5), momentum=0.0, weight_decay=0.0)
    updates, _ = tx.update({"w": jnp.array([4.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-2.0])


def test_optimizer_jits_with_its_state():
    params = {"w": jnp.ones(4)}
    tx = sgd(params, poly_schedule(0.01, 100), weight_decay=5e-4)
    state = tx.init(params)
    step = jax.jit(lambda s, g, p: tx.update(g, s, p))
    for _ in range(3):
        _, state = step(state, {"w": jnp.ones(4)}, params)
    assert int(state[-1].count) == 3  # the lr schedule's position
