import jax
import jax.numpy as jnp
import pytest
from flax.traverse_util import flatten_dict

from mcibi_jax.models.backbones.hrnet import (
    ARCH_SETTINGS,
    HRNet,
    HRStage,
    hrnet_out_channels,
    hrnet_stages,
)
from mcibi_jax.porting.mapping import flax_path, torch_shape_to_flax
from tests.reference_data import KEYS

PREFIX = "backbone_net."


def _variable_shapes(
    model: HRNet, size: tuple[int, int] = (64, 64)
) -> dict[tuple[str, ...], tuple[int, ...]]:
    x = jnp.zeros((1, *size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    return {
        (col, *path): tuple(leaf.shape)
        for col in variables
        for path, leaf in flatten_dict(variables[col]).items()
    }


def _backbone_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape, _ = line.split("\t")
        if key.startswith(PREFIX):
            keys[key[len(PREFIX) :]] = tuple(
                int(s) for s in shape.strip("()").split(",") if s.strip()
            )
    return keys


@pytest.mark.parametrize(
    "keys_file, mcibi_version",
    [("hrnetv2w48_ade20k.txt", False), ("hrnetv2w48_cityscapes.txt", True)],
)
def test_released_layout(keys_file: str, mcibi_version: bool) -> None:
    path = KEYS / keys_file
    if not path.exists():
        pytest.skip(f"{path} not available")
    flax_shapes = _variable_shapes(HRNet(arch="hrnetv2_w48", mcibi_version=mcibi_version))
    mapped = {}
    for key, shape in _backbone_keys(keys_file).items():
        flax_key = flax_path(key, len(shape))
        if flax_key is None:
            continue
        assert flax_key not in mapped, f"{key} collides with {mapped[flax_key]}"
        assert flax_key in flax_shapes, f"{key} -> {flax_key} has no Flax variable"
        assert torch_shape_to_flax(flax_key, shape) == flax_shapes[flax_key], key
        mapped[flax_key] = key
    assert set(mapped) == set(flax_shapes), sorted(set(flax_shapes) - set(mapped))[:10]


def test_tiny_output_shape() -> None:
    # Shapes only (jax.eval_shape: nothing runs); the fixtures check the values.
    model = HRNet(arch="hrnetv2_tiny")
    x = jax.ShapeDtypeStruct((2, 37, 45, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
    (out,) = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, 10, 12, hrnet_out_channels("hrnetv2_tiny")) == (2, 10, 12, 60)
    (out_train,), updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    assert out_train.shape == out.shape
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )


def test_explicit_arch_matches_registered() -> None:
    reference_format = {
        "stage1": {
            "num_modules": 1,
            "num_branches": 1,
            "block": "BOTTLENECK",
            "num_blocks": (1,),
            "num_channels": (8,),
        },
        "stage2": {
            "num_modules": 1,
            "num_branches": 2,
            "block": "BASIC",
            "num_blocks": (1, 1),
            "num_channels": (4, 8),
        },
        "stage3": {
            "num_modules": 2,
            "num_branches": 3,
            "block": "BASIC",
            "num_blocks": (1, 1, 1),
            "num_channels": (4, 8, 16),
        },
        "stage4": {
            "num_modules": 2,
            "num_branches": 4,
            "block": "BASIC",
            "num_blocks": (1,) * 4,
            "num_channels": (4, 8, 16, 32),
        },
    }
    assert hrnet_stages(reference_format) == ARCH_SETTINGS["hrnetv2_tiny"]
    small = (
        HRStage(1, 1, "BOTTLENECK", (1,), (4,)),
        HRStage(1, 2, "BASIC", (1, 1), (2, 4)),
        HRStage(1, 3, "BASIC", (1, 1, 1), (2, 4, 8)),
        HRStage(1, 4, "BASIC", (1, 1, 1, 1), (2, 4, 8, 16)),
    )
    shapes = _variable_shapes(HRNet(arch=small, multiscale_output=False), (32, 32))
    # single-scale output: the last module fuses into branch 0 only
    assert not any(
        path[:4] == ("params", "stage4", "0", "fuse_layers") and path[4] != "0" for path in shapes
    )
    assert hrnet_out_channels(small, multiscale_output=False) == 2
