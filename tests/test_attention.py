"""Pixel-to-pixel attention in query chunks (large maps) computes the same numbers as in one
piece, values and gradients, and keeps less in memory for the backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models import attention
from mcibi_jax.models.attention import SelfAttentionBlock, dot_product_attention

SCALE = 0.25


def _inputs(dtype, num_queries=37, num_keys=20, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((2, n, 6)), dtype) for n in (num_queries, num_keys))
    v = jnp.asarray(rng.standard_normal((2, num_keys, 5)), dtype)
    g = jnp.asarray(rng.standard_normal((2, num_queries, 5)), dtype)
    return q, k, v, g


def _pulled_back(max_chunk_elements, q, k, v, g):
    def attend(q, k, v):
        return dot_product_attention(q, k, v, SCALE, max_chunk_elements)

    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(g))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.float64, 1e-13)])
# 100 elements: 5 rows per chunk, 8 chunks with 3 padded query rows; 400: 2 balanced chunks
@pytest.mark.parametrize("max_chunk_elements", [20, 100, 400])
def test_chunks_compute_the_same_values_and_gradients(dtype, tol, max_chunk_elements):
    with jax.enable_x64(dtype == jnp.float64):
        inputs = _inputs(dtype)
        whole = jax.jit(lambda *a: _pulled_back(10**9, *a))(*inputs)
        chunked = jax.jit(lambda *a: _pulled_back(max_chunk_elements, *a))(*inputs)
        for got, want in zip(chunked, whole):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_chunks_in_bfloat16_match_float32():
    q, k, v, g = _inputs(jnp.float32)
    got = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), SCALE, 100)
    want = dot_product_attention(q, k, v, SCALE)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)


def test_chunks_are_used_only_above_the_limit():
    q, k, v, _ = _inputs(jnp.float32, num_queries=16, num_keys=16)

    def has_loop(max_chunk_elements):
        jaxpr = jax.make_jaxpr(lambda *a: dot_product_attention(*a, SCALE, max_chunk_elements))
        return "scan" in str(jaxpr(q, k, v))

    assert not has_loop(256) and has_loop(255)


def test_chunks_keep_less_for_the_backward_pass():
    """XLA's memory plan of the gradient: without chunks it holds 1024x1024 similarities per
    image (4 MiB each in float32), with chunks of 128 query rows an eighth of that."""
    q, k, v, _ = _inputs(jnp.float32, num_queries=1024, num_keys=1024)

    def scratch_bytes(max_chunk_elements):
        def loss(q, k, v):
            return jnp.sum(dot_product_attention(q, k, v, SCALE, max_chunk_elements) ** 2)

        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = scratch_bytes(None), scratch_bytes(128 * 1024)
    similarities = 2 * 1024 * 1024 * 4  # one float32 matrix per image, both images
    assert whole >= 2 * similarities
    assert chunked < similarities / 2


def test_attention_block_with_chunks(monkeypatch):
    """The block, values and parameter gradients (training) and values (evaluation), with the
    module's limits lowered so that an 8x8 map attends in chunks."""
    block = SelfAttentionBlock(transform_channels=8, out_channels=6)
    rng = np.random.default_rng(1)
    x, y = (jnp.asarray(rng.standard_normal((2, 8, 8, c)), jnp.float32) for c in (5, 7))
    variables = block.init(jax.random.key(0), x, y, False)

    def run():
        def loss(params):
            out, _ = block.apply(
                {**variables, "params": params}, x, y, True, mutable=["batch_stats"]
            )
            return jnp.sum(out**2), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    def evaluate():
        return jax.jit(lambda: block.apply(variables, x, y, False))()

    (_, want), want_grads = run()
    want_eval = evaluate()
    monkeypatch.setattr(attention, "MAX_ATTENTION_CHUNK_ELEMENTS", 64 * 10)
    monkeypatch.setattr(attention, "MAX_EVAL_ATTENTION_CHUNK_ELEMENTS", 64 * 10)
    assert "scan" in str(jax.make_jaxpr(lambda: block.apply(variables, x, y, False))())
    (_, got), got_grads = run()
    np.testing.assert_allclose(evaluate(), want_eval, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_grads, want_grads
    )


def test_training_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv(attention.ATTENTION_CHUNK_ENV, raising=False)
    assert attention.training_chunk_limit() == attention.MAX_ATTENTION_CHUNK_ELEMENTS
    monkeypatch.setenv(attention.ATTENTION_CHUNK_ENV, "1000")
    assert attention.training_chunk_limit() == 1000
    monkeypatch.setenv(attention.ATTENTION_CHUNK_ENV, "0")
    q, k, v, _ = _inputs(jnp.float32, num_queries=4096, num_keys=4096)
    jaxpr = jax.make_jaxpr(
        lambda *a: dot_product_attention(*a, SCALE, attention.training_chunk_limit())
    )
    assert "scan" not in str(jaxpr(q, k, v))
    monkeypatch.setenv(attention.ATTENTION_CHUNK_ENV, "many")
    with pytest.raises(ValueError, match="MCIBI_ATTENTION_CHUNK_ELEMENTS='many'"):
        attention.training_chunk_limit()
