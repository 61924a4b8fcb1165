"""ViT self-attention head by head (the CPU route for long token sequences) computes the same
numbers as all heads at once, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.backbones import vit
from mcibi_jax.models.backbones.vit import (
    SelfAttention,
    per_head_attention,
    use_per_head_attention,
)
from mcibi_jax.models.layers import softmax


def all_heads_attention(q, k, v):
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision="highest")
    return jnp.einsum("nhqk,nkhd->nqhd", softmax(logits), v, precision="highest")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.float64, 1e-12)])
def test_per_head_attention_values_and_gradients(dtype, tol):
    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v, g = (jnp.asarray(rng.standard_normal((2, 9, 3, 4)), dtype) for _ in range(4))

        def pulled_back(attention):
            out, vjp = jax.vjp(attention, q, k, v)
            return (out, *vjp(g))

        got = jax.jit(lambda: pulled_back(per_head_attention))()
        want = jax.jit(lambda: pulled_back(all_heads_attention))()
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_route_rule():
    cpu = jax.default_backend() == "cpu"
    assert use_per_head_attention(1, 16, 1025, jnp.float32) == cpu  # ViT-L at 512x512
    assert not use_per_head_attention(2, 16, 257, jnp.float32)  # ViT-L at 256x256


def test_self_attention_module_takes_either_route_with_the_same_output(monkeypatch):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 12)), jnp.float32)
    module = SelfAttention(embed_dims=12, num_heads=3)
    variables = module.init(jax.random.PRNGKey(0), x, False)
    monkeypatch.setattr(vit, "PER_HEAD_ATTENTION_BYTES", 2**40)
    all_heads = module.apply(variables, x, False)
    monkeypatch.setattr(vit, "PER_HEAD_ATTENTION_BYTES", 0)
    hlo = jax.jit(lambda v: module.apply(v, x, False)).lower(variables).as_text()
    assert ("while" in hlo) == (jax.default_backend() == "cpu")
    np.testing.assert_allclose(module.apply(variables, x, False), all_heads, rtol=1e-5, atol=1e-6)
