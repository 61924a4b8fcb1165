"""The released recipes: configs load, and each model has exactly its checkpoint's layout."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from mcibi_jax.config import ConfigError, load_config
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.porting.convert import PortError, state_dict_to_variables
from mcibi_jax.porting.variables import abstract_variables
from mcibi_jax.recipes import KEYS_FILES, RELEASED, released_config
from tests.reference_data import KEYS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

IDS = [f"{d}-{b}" for d, b in RELEASED]


def spec(dataset: str, backbone: str) -> str:
    return f"{CONFIGS / dataset}.py:{backbone}"


def zero_state_dict(name: str) -> dict[str, np.ndarray]:
    """The released layout ``keys/<name>.txt`` as zero-memory arrays."""
    path = KEYS / f"{name}.txt"
    if not path.exists():
        pytest.skip(f"{path} not available")
    state = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, shape, *_ = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        dtype = np.int64 if key.endswith("num_batches_tracked") else np.float32
        state[key] = np.broadcast_to(np.zeros((), dtype), shape)
    return state


@functools.cache
def abstract_of(dataset: str, backbone: str) -> dict:
    model_config = released_config(dataset, backbone).model
    return abstract_variables(build_model(model_config), model_config)


@pytest.mark.parametrize("dataset,backbone", RELEASED, ids=IDS)
def test_config_loads_and_matches_checkpoint_layout(dataset, backbone):
    config = load_config(spec(dataset, backbone))
    assert config == released_config(dataset, backbone)
    assert config.model.num_classes == config.dataset.num_classes
    assert config.dtype == "float32"
    assert config.model.inference.mode in ("whole", "slide")
    assert config.eval.use_tta is False

    state = zero_state_dict(KEYS_FILES[(dataset, backbone)])
    variables = state_dict_to_variables(state, abstract_of(dataset, backbone))
    memory = variables["memory"]["memory_module"]["memory"]
    assert memory.shape == (config.model.num_classes, 1, config.model.head.feats_channels)


def test_released_table():
    assert len(RELEASED) == 18 == len(set(RELEASED))
    assert set(KEYS_FILES) == set(RELEASED)
    assert KEYS_FILES[("cityscapes", "r50")] == "resnet50os8_cityscapes"
    assert {d for d, b in RELEASED if b == "vitl"} == {"ade20k", "cocostuff10k"}


def test_default_arg_is_r50():
    assert load_config(CONFIGS / "ade20k.py") == released_config("ade20k", "r50")


@pytest.mark.parametrize(
    "dataset,backbone,choices",
    [
        ("lip", "vitl", "backbones for lip: r50, r101, s101, hrnet48"),
        ("cityscapes", "vitl", "backbones for cityscapes: r50, r101, s101, hrnet48"),
        ("voc", "r50", "datasets: cityscapes, ade20k, cocostuff10k, lip"),
        ("lip", "r18", "backbones for lip: r50, r101, s101, hrnet48"),
    ],
)
def test_unreleased_combination_lists_the_choices(dataset, backbone, choices):
    with pytest.raises(ValueError, match=choices):
        released_config(dataset, backbone)


def test_wrong_pairing_is_refused():
    with pytest.raises(PortError, match=r"memory_module\.memory"):
        state_dict_to_variables(
            zero_state_dict(KEYS_FILES[("ade20k", "r50")]), abstract_of("cityscapes", "r50")
        )


def test_overrides():
    overrides = ["model.num_classes=7", "train.optimizer.lr=0.02", "eval.use_tta=True"]
    config = load_config(spec("cityscapes", "r50"), overrides)
    assert (
        config.model.num_classes == 7 and config.train.optimizer.lr == 0.02 and config.eval.use_tta
    )
    abstract = abstract_variables(build_model(config.model), config.model)
    assert abstract["memory"]["memory_module"]["memory"].shape == (7, 1, 512)
    with pytest.raises(ConfigError):
        load_config(spec("cityscapes", "r50"), ["model.head.no_such_option=1"])
    with pytest.raises(ConfigError):
        load_config(spec("cityscapes", "r50"), ["nothing.here=1"])


def test_configs_are_independent():
    a = released_config("ade20k", "vitl")
    a.model.backbone.out_indices = (0,)
    a.train.optimizer.param_rules.backbone_net.lr_multiplier = 1.0
    a.model.inference.multiscale.append(2.0)
    b = released_config("ade20k", "vitl")
    assert b.model.backbone.out_indices == (9, 14, 19, 23)
    assert b.train.optimizer.param_rules.backbone_net.lr_multiplier == 0.1
    assert b.model.inference.multiscale == [1]


def test_recipes_reproduce_the_reference_on_8_gpus():
    from mcibi_jax.train.experiment import check_train_config

    for dataset, backbone in RELEASED:
        train = released_config(dataset, backbone).train
        assert train.num_replicas == 8 and train.batch_size % 8 == 0, (dataset, backbone)
    config = load_config("configs/ade20k.py:r50", ["train.batch_size=2"])
    with pytest.raises(
        ConfigError, match=r"num_replicas=8 must divide train.batch_size=2 .*num_replicas=1"
    ):
        check_train_config(config)
    check_train_config(
        load_config("configs/ade20k.py:r50", ["train.batch_size=2", "train.num_replicas=1"])
    )
    assert load_config("configs/custom_template.py:r50").train.num_replicas == 1
