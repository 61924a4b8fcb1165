"""EMA of the weights (train.ema_decay): the update rule, training with it, and the porter's --ema."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcibi_jax import port
from mcibi_jax.config import load_config
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.porting.convert import variables_to_state_dict
from mcibi_jax.porting.pth import save_state_dict
from mcibi_jax.porting.variables import load_variables
from mcibi_jax.train.experiment import run
from mcibi_jax.train.state import create_train_state, ema_update, init_variables

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def test_ema_update_is_the_reference_rule():
    ema = {"w": jnp.array([1.0, 2.0]), "b": {"m": jnp.array(4.0)}}
    new = {"w": jnp.array([3.0, 0.0]), "b": {"m": jnp.array(0.0)}}
    # reference: ema * (1 - momentum) + momentum * current, momentum = 1 - decay
    out = ema_update(ema, new, 0.75)
    np.testing.assert_allclose(out["w"], [1.5, 1.5])
    np.testing.assert_allclose(out["b"]["m"], 3.0)
    # repeated updates towards a constant converge geometrically: ema_n - c = decay^n (ema_0 - c)
    value = {"x": jnp.array(10.0)}
    for _ in range(5):
        value = ema_update(value, {"x": jnp.array(0.0)}, 0.5)
    np.testing.assert_allclose(value["x"], 10.0 * 0.5**5)


def test_toy_state_starts_as_a_copy_and_is_off_by_default():
    variables = {
        "params": {"w": jnp.ones((2,))},
        "batch_stats": {"s": jnp.zeros((2,))},
        "memory": {"m": jnp.ones((1,))},
    }
    tx = optax.sgd(0.1)
    assert create_train_state(variables, tx).ema_params is None
    state = create_train_state(variables, tx, ema=True)
    assert jax.tree_util.tree_structure(state.ema_params) == jax.tree_util.tree_structure(
        state.variables
    )
    np.testing.assert_array_equal(state.export_variables["params"]["w"], 1.0)
    state = state.replace(params={"w": jnp.full((2,), 3.0)})
    state = state.replace(ema_params=ema_update(state.ema_params, state.variables, 0.9))
    np.testing.assert_allclose(state.export_variables["params"]["w"], 1.2)
    np.testing.assert_allclose(state.variables["params"]["w"], 3.0)


FAST = [
    "dataset.image_size=(32, 32)",
    "dataset.train.num_images=8",
    "dataset.test.num_images=8",
    "train.log_every=1",
]


def _state_at(workdir, step, config, initial):
    from mcibi_jax.train.checkpoints import TrainCheckpoints
    from mcibi_jax.train.optimizer import optimizer_from_config

    tx, _ = optimizer_from_config(initial["params"], config.train, 1)
    like = create_train_state(initial, tx, ema=True)
    checkpoints = TrainCheckpoints(workdir / "train_state")
    try:
        return checkpoints.restore(step, like)[0]
    finally:
        checkpoints.close()


def _assert_tree_close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_demo_with_ema_exports_the_average(tmp_path):
    # one step per epoch, a checkpoint after each
    config = load_config(DEMO, FAST + ["train.num_epochs=2"])
    config.train.ema_decay = 0.5
    lines = []
    results = run(config, tmp_path, "train", log=lines.append)
    assert any("keeping an EMA" in line for line in lines) and any(
        "EMA weights" in line for line in lines
    )
    assert results["train"]["steps"] == 2 and results["ema_decay"] == 0.5
    initial = init_variables(build_model(config.model), jax.random.key(0, impl="rbg"), (32, 32))
    first, second = (_state_at(tmp_path, step, config, initial) for step in (1, 2))

    def half(a, b):
        return jax.tree_util.tree_map(lambda x, y: 0.5 * x + 0.5 * y, a, b)

    _assert_tree_close(first.ema_params, half(initial, first.variables))
    _assert_tree_close(second.ema_params, half(first.ema_params, second.variables))
    exported = load_variables(results["checkpoint"], config)
    _assert_tree_close(exported, second.ema_params)

    def leaf(tree):
        return np.asarray(jax.tree_util.tree_leaves(tree["params"])[0])

    # the export is the average, not the last weights
    assert not np.allclose(leaf(exported), leaf(second.variables))
    assert json.loads((tmp_path / "results.json").read_text())["ema_decay"] == 0.5


def test_port_ema_flag_reads_model_ema(tmp_path, capsys):
    config = load_config(DEMO, [])
    variables = init_variables(build_model(config.model), jax.random.key(3, impl="rbg"), (32, 32))
    pth = tmp_path / "ema.pth"
    save_state_dict(variables_to_state_dict(variables), pth, wrap_key="model_ema")
    # no 'model' entry
    assert port.main([f"--config={DEMO}", f"--pth={pth}", f"--out={tmp_path / 'plain'}"]) == 2
    capsys.readouterr()
    out = tmp_path / "ema"
    assert port.main([f"--config={DEMO}", f"--pth={pth}", f"--out={out}", "--ema"]) == 0
    assert "ported" in capsys.readouterr().out
    restored = load_variables(out, config)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_decay_is_a_config_error():
    import pytest

    from mcibi_jax.config import ConfigError
    from mcibi_jax.train.experiment import check_train_config

    config = load_config(DEMO, [])
    check_train_config(config)
    config.train.ema_decay = 1.0
    with pytest.raises(ConfigError, match="ema_decay"):
        check_train_config(config)
