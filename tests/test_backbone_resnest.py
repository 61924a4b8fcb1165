import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from mcibi_jax.models.backbones.resnest import ResNeSt
from mcibi_jax.porting.mapping import flax_path, torch_shape_to_flax
from tests.reference_data import KEYS

KEY_FILES = sorted(KEYS.glob("resnest101os8_*.txt"))
PREFIX = "backbone_net."


def released_backbone_layout(path: Path) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path -> Flax shape of every ``backbone_net.*`` entry of a keys file."""
    layout = {}
    for line in path.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if not name.startswith(PREFIX):
            continue
        shape = tuple(ast.literal_eval(shape))
        flax = flax_path(name[len(PREFIX) :], len(shape))
        if flax is not None:
            layout[flax] = torch_shape_to_flax(flax, shape)
    return layout


@pytest.fixture(scope="module")
def released_layout() -> dict[tuple[str, ...], tuple[int, ...]]:
    model = ResNeSt(depth=101, outstride=8)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False)
    )
    return {path: tuple(leaf.shape) for path, leaf in flatten_dict(dict(variables)).items()}


@pytest.mark.skipif(
    not KEY_FILES, reason="no resnest101os8 key files in tests/reference (or MCIBI_SHARED)"
)
@pytest.mark.parametrize("key_file", KEY_FILES, ids=lambda p: p.stem)
def test_released_key_layout(key_file: Path, released_layout) -> None:
    expected = released_backbone_layout(key_file)
    assert expected, f"no {PREFIX} keys in {key_file}"
    assert set(released_layout) - set(expected) == set(), "Flax leaves with no released key"
    assert set(expected) - set(released_layout) == set(), "released keys with no Flax leaf"
    mismatched = {
        k: (released_layout[k], v) for k, v in expected.items() if released_layout[k] != v
    }
    assert not mismatched


def test_small_output_shapes() -> None:
    # Shapes only (jax.eval_shape: nothing runs); the fixtures check values and statistics.
    model = ResNeSt(depth=50, base_channels=4, stem_channels=8, outstride=8)
    x = jax.ShapeDtypeStruct((2, 35, 42, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(1), x, False), x)
    for train in (False, True):
        outs, updates = jax.eval_shape(
            lambda v, x, train=train: model.apply(v, x, train, mutable=("batch_stats",)),
            variables,
            x,
        )
        # stem /2 -> 18x21, max-pool /2 -> 9x11, layer2 /2 (ceil) -> 5x6, then dilated
        assert [o.shape for o in outs] == [
            (2, 9, 11, 16),
            (2, 5, 6, 32),
            (2, 5, 6, 64),
            (2, 5, 6, 128),
        ]
        assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )


def test_out_indices_and_output_stride_16() -> None:
    model = ResNeSt(depth=50, base_channels=4, stem_channels=8, outstride=16, out_indices=(1, 3))
    x = jnp.zeros((1, 32, 32, 3))
    outs = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, False)[0])
    assert [o.shape for o in outs] == [(1, 4, 4, 32), (1, 2, 2, 128)]


@pytest.mark.parametrize("radix", [1, 2, 4])
def test_split_attention_sum_and_hold_change_no_number(radix: int, monkeypatch) -> None:
    """The split-attention output sums the weighted splits as adds of slices and, on CPU, goes
    through one conditional (a fusion boundary: XLA:CPU otherwise fuses the sum into the next 1x1
    conv's matmul, 5x slower); XLA:CPU's reduce over the short radix axis ran 30x slower, so the
    HLO has none. The same values as ``jnp.sum`` without the hold."""
    from mcibi_jax.models.backbones import resnest

    block = resnest.SplitAttentionConv(channels=8, radix=radix)
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
    variables = block.init(jax.random.key(0), x, False)
    ours = block.apply(variables, x, False)
    hlo = jax.jit(lambda v: block.apply(v, x, False)).lower(variables).as_text("hlo")
    assert hlo.count("conditional(") == (1 if jax.default_backend() == "cpu" else 0)
    assert not re.search(r"= f32\[2,6,6,8\]\S* reduce\(", hlo)  # a sum over the radix axis

    monkeypatch.setattr(resnest, "_sum_splits", lambda splits: jnp.sum(splits, axis=-2))
    monkeypatch.setattr(resnest, "hold_on_cpu", lambda v: v)
    plain = block.apply(variables, x, False)
    np.testing.assert_allclose(ours, plain, rtol=1e-6, atol=1e-7)
