"""configs/ as data: the configs the package builds are exactly the ones frozen in
tests/released_configs.json (written before the configs moved from mcibi_jax/recipes.py into
configs/; ``model.head.update`` has since been renamed ``memory_update``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
