"""configs/ as data: the configs the package builds are exactly the ones frozen in
tests/released_configs.json (written before the configs moved from mcibi_jax/recipes.py into
configs/; ``model.head.update`` has since been renamed ``memory_update``, and
``model.head.remat``, off, was added)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcibi_jax.command_line import CommandLine
from mcibi_jax.config import load_config
from mcibi_jax.recipes import RELEASED, released_config

REPO = Path(__file__).resolve().parents[1]
FROZEN = json.loads((REPO / "tests" / "released_configs.json").read_text())


def typed(value):
    """A config as JSON-able data that keeps tuples apart from lists and 1 apart from 1.0."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [typed(v) for v in value]}
    if isinstance(value, list):
        return [typed(v) for v in value]
    assert value is None or isinstance(value, (int, float, str, bool)), type(value)
    return value


def frozen(name: str) -> dict:
    config = json.loads(json.dumps(FROZEN[name]))
    head = config["model"]["head"]
    head["memory_update"] = head.pop("update")
    head["remat"] = False
    return config


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("dataset,backbone", RELEASED, ids=[f"{d}-{b}" for d, b in RELEASED])
def test_released_configs_are_unchanged(dataset, backbone):
    expected = frozen(f"{dataset}:{backbone}")
    assert same(typed(released_config(dataset, backbone)), expected)
    assert same(typed(load_config(REPO / "configs" / f"{dataset}.py:{backbone}")), expected)


def test_demo_config_is_unchanged():
    assert same(typed(load_config(REPO / "configs" / "demo.py")), frozen("demo"))


def test_loaded_configs_are_locked():
    config = load_config(REPO / "configs" / "ade20k.py:r50")
    config.model.head.memory_update.base_lr = 0.5  # an existing key: fine
    with pytest.raises(AttributeError):
        config.model.head.memory_updte = {}
    with pytest.raises(AttributeError):
        config.train.optimizer.learning_rate = 0.1


def _parse(*args: str):
    command = CommandLine("prog", "doc", config="config")
    command.parse(list(args))
    return command.config


def test_config_flags_overrides(capsys):
    config = _parse(
        "--config=configs/ade20k.py:vitl",
        "--config.model.head.memory_update.base_lr=0.5",
        "--config.model.inference.multiscale=[0.5, 1.0]",
        "--config.dataset.train.crop_size=(8, 8)",
        "--config.train.optimizer.lr=1",
        "--config.eval.use_tta",
        "--config.train.init_from=pretrained:ade20k:r50",
    )
    assert config.model.head.memory_update.base_lr == 0.5
    assert config.model.inference.multiscale == [0.5, 1.0]
    assert config.dataset.train.crop_size == (8, 8)
    assert config.train.optimizer.lr == 1.0 and isinstance(config.train.optimizer.lr, float)
    assert config.eval.use_tta is True and config.train.init_from == "pretrained:ade20k:r50"
    with pytest.raises(AttributeError):  # locked
        config.model.head.memory_updte = {}
    with pytest.raises(SystemExit):
        _parse("--config=configs/ade20k.py:r50", "--config.model.head.update.base_lr=0.5")
    assert "unknown config key 'model.head.update'" in capsys.readouterr().err


def test_old_update_key_still_builds(capsys):
    from mcibi_jax.models.segmentor import build_model

    model_config = released_config("lip", "r50").model.to_dict()
    model_config["head"]["update"] = model_config["head"].pop("memory_update")
    model = build_model(model_config)
    assert model.head.memory_update.base_lr == 0.01
    assert "model.head.update is now model.head.memory_update" in capsys.readouterr().err
    del model_config["head"]["dropout"]
    with pytest.raises(ValueError, match=r"model.head: missing key\(s\) dropout"):
        build_model(model_config)
