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
    UNMATCHED,
    group_labels,
    matching_rule,
    optimizer_from_config,
    poly_schedule,
    sgd,
    torch_style_name,
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
    np.testing.assert_allclose(
        [float(schedule(t)) for t in range(5)], [1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4], rtol=1e-6
    )


def test_schedule_from_config_uses_epochs_times_steps():
    config = load_config(
        REPO / "configs" / "demo.py",
        ["train.num_epochs=2", "train.optimizer.lr=0.1", "train.schedule.min_lr=0.0"],
    )
    params = {"w": jnp.zeros(3)}
    _, schedule = optimizer_from_config(params, config.train, steps_per_epoch=5)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(5)) == pytest.approx(0.1 * 0.5**0.9, rel=1e-6)
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-9)


def test_torch_style_names():
    assert (
        torch_style_name(("backbone_net", "layer1", "0", "conv1", "kernel"))
        == "backbone_net.layer1.0.conv1.weight"
    )
    assert torch_style_name(("bottleneck", "1", "scale")) == "bottleneck.1.weight"
    assert torch_style_name(("decoder_stage2", "4", "bias")) == "decoder_stage2.4.bias"
    assert torch_style_name(("backbone_net", "pos_embed")) == "backbone_net.pos_embed"


def test_rule_matching_is_substring_longest_first():
    keys = ["backbone_net", "backbone_net.layer4", "decoder"]
    assert matching_rule("backbone_net.layer4.0.conv1.weight", keys) == "backbone_net.layer4"
    assert matching_rule("backbone_net.layer1.0.conv1.weight", keys) == "backbone_net"
    # substring, as the reference
    assert matching_rule("decoder_stage1.0.weight", keys) == "decoder"
    assert matching_rule("bottleneck.0.weight", keys) is None
    assert matching_rule("ab.weight", ["b", "a"]) == "a"  # equal lengths: alphabetical


def test_group_labels_cover_every_parameter():
    params = {
        "backbone_net": {
            "conv1": {"kernel": jnp.ones((3, 3, 1, 1))},
            "bn1": {"scale": jnp.ones(1), "bias": jnp.ones(1)},
        },
        "head": {"kernel": jnp.ones((1, 1))},
    }
    labels = group_labels(params, {"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 0.5}})
    # norms and biases are grouped like every other parameter (no exclusions in the reference's default)
    assert labels == {
        "backbone_net": {
            "conv1": {"kernel": "backbone_net"},
            "bn1": {"scale": "backbone_net", "bias": "backbone_net"},
        },
        "head": {"kernel": UNMATCHED},
    }
    with pytest.raises(ValueError, match="unsupported options"):
        group_labels(params, {"head": {"lr_mult": 2.0}})


def test_sgd_matches_torch_semantics_by_hand():
    """Two steps of torch SGD(momentum=0.9, weight_decay=wd) per group, written out."""
    params = {"backbone_net": {"w": jnp.array([1.0, -2.0])}, "head": {"w": jnp.array([0.5])}}
    grads = {"backbone_net": {"w": jnp.array([0.3, 0.1])}, "head": {"w": jnp.array([-0.2])}}
    schedule = poly_schedule(0.1, 2, power=0.9, min_lr=0.0)  # lr_0 = 0.1, lr_1 = 0.1 * 0.5 ** 0.9
    tx = sgd(
        params,
        schedule,
        momentum=0.9,
        weight_decay=0.01,
        param_rules={"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 2.0}},
    )
    state = tx.init(params)
    p = params
    for _ in range(2):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)

    lr0, lr1 = 0.1, 0.1 * 0.5**0.9
    # backbone: lr x 0.1, wd 0.02.  step 0: d = g + wd p; buf = d; p -= lr0 * 0.1 * buf
    w, g = np.array([1.0, -2.0]), np.array([0.3, 0.1])
    buf = g + 0.02 * w  # [0.32, 0.06]
    w = w - lr0 * 0.1 * buf  # [0.9968, -2.0006]
    np.testing.assert_allclose(w, [0.9968, -2.0006], rtol=1e-12)
    buf = 0.9 * buf + (g + 0.02 * w)  # step 1: buf = 0.9 buf + d
    w = w - lr1 * 0.1 * buf
    np.testing.assert_allclose(p["backbone_net"]["w"], w, rtol=1e-6)
    # head: lr x 1, wd 0.01
    h, gh = 0.5, -0.2
    buf = gh + 0.01 * h  # -0.195
    h = h - lr0 * buf  # 0.5195
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
    counts = optax.tree_utils.tree_get_all_with_path(state, "count")  # the lr schedule's position
    assert counts and all(int(count) == 3 for _, count in counts)


def test_poly_schedule_holds_min_lr_after_the_end_when_jitted():
    """Jitted, 1 - t / T at t = T can come out a hair off 0 (XLA fuses it into a multiply-add):
    a tiny positive lr where min_lr = 0, or NaN from a fractional power of a negative number."""
    for total, min_lr in [(160000, 0.0), (3, 1e-4), (80000, None)]:
        schedule = jax.jit(poly_schedule(0.01, total, power=0.9, min_lr=min_lr))
        end = 1e-4 if min_lr is None else min_lr
        for step in (total, total + 1, 2 * total):
            assert float(schedule(jnp.int32(step))) == np.float32(end)


# The optimizer, written by hand before it was built from optax's parts: its final params after
# four updates (T = 3: the last one at min_lr) of the tree below, under groups that nest.
_RULES = {
    "backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 1.0},
    "backbone_net.layer4": {"lr_multiplier": 0.5, "wd_multiplier": 0.0},
    "decoder": {"lr_multiplier": 2.0, "wd_multiplier": 3.0},
}
_FROZEN_PARAMS = {
    (0.9, 5e-4): {
        "backbone_net/layer1/bn/bias": [-0.3013533055782318, 0.2023688107728958],
        "backbone_net/layer1/bn/scale": [0.4986453652381897, 1.2523671388626099],
        "backbone_net/layer1/conv/kernel": [
            -1.001352071762085,
            0.25050726532936096,
            1.5023666620254517,
        ],
        "backbone_net/layer4/conv/kernel": [
            0.743230938911438,
            -0.6224615573883057,
            -1.9881541728973389,
        ],
        "bottleneck/bias": [0.9864449501037598, 2.0236575603485107],
        "decoder_stage1/kernel": [
            -0.6270148754119873,
            -0.10224616527557373,
            0.42252254486083984,
            0.9472911953926086,
        ],
    },
    (0.0, 0.0): {
        "backbone_net/layer1/bn/bias": [-0.3008342683315277, 0.20145994424819946],
        "backbone_net/layer1/bn/scale": [0.49916574358940125, 1.251460075378418],
        "backbone_net/layer1/conv/kernel": [
            -1.0008342266082764,
            0.25031283497810364,
            1.501460075378418,
        ],
        "backbone_net/layer4/conv/kernel": [
            0.7458287477493286,
            -0.6234357953071594,
            -1.992700219154358,
        ],
        "bottleneck/bias": [0.9916574358940125, 2.014599561691284],
        "decoder_stage1/kernel": [
            -0.6166850328445435,
            -0.10139042139053345,
            0.41390421986579895,
            0.9291988015174866,
        ],
    },
}


@pytest.mark.parametrize("momentum, weight_decay", list(_FROZEN_PARAMS))
def test_sgd_reproduces_the_hand_written_optimizer(momentum, weight_decay):
    def line(n, first, last):
        return jnp.asarray(np.linspace(first, last, n, dtype=np.float32))

    params = {
        "backbone_net": {
            "layer1": {
                "conv": {"kernel": line(3, -1.0, 1.5)},
                "bn": {"scale": line(2, 0.5, 1.25), "bias": line(2, -0.3, 0.2)},
            },
            "layer4": {"conv": {"kernel": line(3, 0.75, -2.0)}},
        },
        "decoder_stage1": {"kernel": line(4, -0.6, 0.9)},
        "bottleneck": {"bias": line(2, 1.0, 2.0)},
    }
    grads = jax.tree.map(lambda p: line(p.size, 0.4, -0.7), params)
    tx = sgd(
        params,
        poly_schedule(0.01, 3, power=0.9),
        momentum=momentum,
        weight_decay=weight_decay,
        param_rules=_RULES,
    )
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(4):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    got = {
        "/".join(k.key for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert got.keys() == _FROZEN_PARAMS[momentum, weight_decay].keys()
    for name, expected in _FROZEN_PARAMS[momentum, weight_decay].items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-7, err_msg=name)
