"""bfloat16 models ask no float32 precision (``Precision.HIGHEST``) of bfloat16 products: it asks
nothing more of them, and XLA:TPU's kernels reject it (the head's attention failed to compile for
a TPU v5e: "Mosaic failed to compile TPU kernel: Bad lhs type"). float32 ones keep it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import mcibi_jax
from mcibi_jax.models.layers import product_precision
from mcibi_jax.train.state import init_variables
from tests.helpers import jaxpr_equations


def test_product_precision():
    f32, bf16 = jnp.ones(2, jnp.float32), jnp.ones(2, jnp.bfloat16)
    assert product_precision(f32, f32) == jax.lax.Precision.HIGHEST
    assert product_precision(bf16, f32) == jax.lax.Precision.HIGHEST  # promoted to float32
    assert product_precision(bf16, bf16) is None


def _highest_on_bfloat16(jaxpr) -> list[str]:
    return [
        str(eqn.source_info.name_stack)
        for eqn in jaxpr_equations(jaxpr)
        if eqn.primitive.name in ("dot_general", "conv_general_dilated")
        and "HIGHEST" in str(eqn.params.get("precision"))
        and "bfloat16" in {str(v.aval.dtype) for v in eqn.invars}
    ]


@pytest.mark.parametrize("spec", ["configs/cityscapes.py:r50", "configs/cityscapes.py:hrnet48"])
def test_bfloat16_forward_asks_no_highest_precision(spec):
    """Covers the head's attention and memory read, ASPP's global branch and HRNet's fuse
    layers (their resizes); the backward pass inherits each product's precision."""
    config = mcibi_jax.load_config(spec)
    size = (64, 128)
    model = mcibi_jax.build_model(config.model, dtype=jnp.bfloat16)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), size))
    images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert _highest_on_bfloat16(jaxpr) == []
