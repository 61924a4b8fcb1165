import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mcibi_jax.models.backbones.vit import VisionTransformer
from mcibi_jax.porting.mapping import flax_path, torch_shape_to_flax
from tests.reference_data import KEYS

# Backbone options of the released mcibi_deeplabv3_vitlarge_{ade20k,cocostuff10k} configs.
VIT_LARGE = dict(
    structure_type="jx_vit_large_p16_384",
    img_size=(512, 512),
    out_indices=(9, 14, 19, 23),
    norm_cfg={"type": "LayerNorm", "eps": 1e-6},
    pretrained=True,
    patch_size=16,
    embed_dims=1024,
    num_layers=24,
    num_heads=16,
    mlp_ratio=4,
    qkv_bias=True,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.0,
    with_cls_token=True,
    output_cls_token=False,
    patch_norm=False,
    final_norm=False,
    num_fcs=2,
)

TINY = dict(
    structure_type="vit_tiny",
    img_size=(64, 64),
    out_indices=(0, 1, 2, 3),
    patch_size=16,
    embed_dims=32,
    num_layers=4,
    num_heads=4,
    mlp_ratio=4,
)


def _expected_variables(keys_file: Path) -> dict[tuple[str, ...], tuple[int, ...]]:
    expected = {}
    for line in keys_file.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if not name.startswith("backbone_net."):
            continue
        shape = tuple(ast.literal_eval(shape))
        path = flax_path(name[len("backbone_net.") :], len(shape))
        if path is not None:
            assert path not in expected, name
            expected[path] = torch_shape_to_flax(path, shape)
    return expected


@pytest.mark.parametrize("case", ["vitlarge_ade20k", "vitlarge_cocostuff10k"])
def test_released_key_layout(case):
    keys_file = KEYS / f"{case}.txt"
    if not keys_file.exists():
        pytest.skip(f"{keys_file} not available")
    model = VisionTransformer(**VIT_LARGE)
    x = jnp.zeros((1, 512, 512, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, False))
    actual = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables).items()}
    expected = _expected_variables(keys_file)
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert {k: v for k, v in expected.items() if actual[k] != v} == {}
    outputs = jax.eval_shape(lambda v: model.apply(v, x, False), variables)
    assert [o.shape for o in outputs] == [(1, 32, 32, 1024)] * 4


@pytest.mark.parametrize("size", [(64, 64), (70, 90), (32, 128)])
@pytest.mark.parametrize("train", [False, True])
def test_output_shapes(size, train):
    model = VisionTransformer(**TINY)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), False)
    )
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    rngs = {"dropout": jax.random.PRNGKey(1)}
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train, rngs=rngs), variables, x)
    grid = (-(-size[0] // 16), -(-size[1] // 16))  # corner padding rounds the patch grid up
    assert [o.shape for o in outputs] == [(2, *grid, 32)] * 4


def test_forward_runs_with_pos_embed_resizing():
    model = VisionTransformer(**TINY)
    variables = jax.jit(model.init, static_argnums=2)(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), False
    )
    x = jnp.asarray(np.random.RandomState(0).randn(2, 70, 90, 3), jnp.float32)
    outputs = jax.jit(model.apply, static_argnums=2)(variables, x, False)
    assert [o.shape for o in outputs] == [(2, 5, 6, 32)] * 4
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outputs)


def test_options_shapes():
    model = VisionTransformer(
        **{
            **TINY,
            "out_indices": -1,
            "out_origin": True,
            "output_cls_token": True,
            "final_norm": True,
            "pre_norm": True,
            "patch_norm": True,
            "num_fcs": 3,
            "drop_path_rate": 0.2,
            "drop_rate": 0.1,
            "attn_drop_rate": 0.1,
            "interpolate_mode": "bicubic",
        }
    )
    x = jnp.ones((2, 40, 24, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, False))
    assert set(variables["params"]) == {
        "patch_embed",
        "cls_token",
        "pos_embed",
        "ln_pre",
        "layers",
        "ln1",
    }
    assert set(variables["params"]["layers"]["0"]["ffn"]["layers"]) == {"0", "1", "2"}
    rngs = {"dropout": jax.random.PRNGKey(1)}
    outputs = jax.eval_shape(lambda v: model.apply(v, x, True, rngs=rngs), variables)
    assert len(outputs) == 2
    for feature, cls in outputs:
        assert feature.shape == (2, 3, 2, 32)
        assert cls.shape == (2, 32)


def test_structure_type_is_checked():
    model = VisionTransformer(**{**VIT_LARGE, "final_norm": True})
    with pytest.raises(ValueError):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False))
