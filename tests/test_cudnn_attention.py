"""Where cuDNN's fused attention is taken (MCIBI_ATTENTION), and the check that decides it by
default. There is no GPU here: JAX's XLA attention stands in for cuDNN's (same arguments), and
faulty stand-ins play a cuDNN that fails or computes something else."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models import cudnn_attention
from mcibi_jax.models.attention import dot_product_attention
from mcibi_jax.models.cudnn_attention import AttentionShape, fused_attention_problem
from tests.helpers import load_script

REAL_ATTENTION = jax.nn.dot_product_attention


def _xla_for_cudnn(*args, implementation=None, **kwargs):
    """JAX's attention as the model calls it for cuDNN, computed by XLA (even lengths only, as
    cuDNN's training kernels)."""
    assert implementation == "cudnn"
    assert args[0].shape[1] % 2 == 0 and args[1].shape[1] % 2 == 0
    return REAL_ATTENTION(*args, implementation="xla", **kwargs)


def _without_lengths(*args, implementation=None, **kwargs):
    """A cuDNN that ignores the sequence lengths: attends to the padding token too."""
    kwargs.pop("query_seq_lengths", None)
    kwargs.pop("key_value_seq_lengths", None)
    return REAL_ATTENTION(*args, implementation="xla", **kwargs)


def _unsupported(*args, implementation=None, **kwargs):
    raise NotImplementedError("The head dim must be <= 128 and a multiple of 8, but got 256.")


def _wrong_scale(*args, implementation=None, scale=None, **kwargs):
    return REAL_ATTENTION(*args, implementation="xla", scale=1.0, **kwargs)


def _wrong_gradients(*args, implementation=None, **kwargs):
    """Right outputs, gradients 5 % too large."""

    def xla(*qkv):
        return REAL_ATTENTION(*qkv, implementation="xla", **kwargs)

    @jax.custom_vjp
    def attend(q, k, v):
        return xla(q, k, v)

    def backward(vjp, g):
        return tuple(x * 1.05 for x in vjp(g))

    attend.defvjp(lambda *qkv: jax.vjp(xla, *qkv), backward)
    return attend(*args)


def _wrong_when_training(*args, implementation=None, scale=None, **kwargs):
    """Right outputs without a backward pass; with one, the output of another scale."""

    def xla(*qkv, scale=scale):
        return REAL_ATTENTION(*qkv, implementation="xla", scale=scale, **kwargs)

    @jax.custom_vjp
    def attend(q, k, v):
        return xla(q, k, v)

    def forward(q, k, v):
        return jax.vjp(functools.partial(xla, scale=1.0), q, k, v)

    attend.defvjp(forward, lambda vjp, g: vjp(g))
    return attend(*args)


@pytest.fixture
def stand_in(monkeypatch):
    """Installs a stand-in for JAX's cuDNN attention; each test sees a fresh check cache."""
    monkeypatch.setattr(cudnn_attention, "_checked", {})
    monkeypatch.delenv(cudnn_attention.ATTENTION_ENV, raising=False)

    def install(function):
        monkeypatch.setattr(cudnn_attention.jax.nn, "dot_product_attention", function)

    return install


def _qkv(dtype, num_queries=12, num_keys=8, heads=1, dims=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, num_queries, heads, dims)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(2, num_keys, heads, dims)), dtype) for _ in range(2))
    return q, k, v


def test_method_and_where_it_applies(monkeypatch, stand_in):
    stand_in(_xla_for_cudnn)
    q, k, v = _qkv(jnp.bfloat16)
    assert cudnn_attention.attention_method() == "auto"
    assert cudnn_attention.use_fused_attention(q, k, v, backend="gpu")  # checked, passes
    assert cudnn_attention.fused_attention_applies(jnp.float16, "cuda")
    assert not cudnn_attention.use_fused_attention(*_qkv(jnp.float32), backend="gpu")  # 16-bit only
    for backend in ("tpu", "cpu"):
        assert not cudnn_attention.use_fused_attention(q, k, v, backend=backend)
    monkeypatch.setenv(cudnn_attention.ATTENTION_ENV, "xla")
    assert not cudnn_attention.use_fused_attention(q, k, v, backend="gpu")
    monkeypatch.setenv(cudnn_attention.ATTENTION_ENV, "cudnn")
    stand_in(_unsupported)  # forced: not checked
    assert cudnn_attention.use_fused_attention(q, k, v, backend="gpu")
    assert not cudnn_attention.use_fused_attention(*_qkv(jnp.float32), backend="gpu")
    monkeypatch.setenv(cudnn_attention.ATTENTION_ENV, "flash")
    with pytest.raises(
        ValueError, match="MCIBI_ATTENTION='flash': expected one of auto, xla, cudnn"
    ):
        cudnn_attention.attention_method()


@pytest.mark.parametrize("num_queries, num_keys", [(12, 8), (13, 13), (6, 9)])
def test_fused_attention_pads_odd_lengths(stand_in, num_queries, num_keys):
    """JAX's cuDNN attention trains on even lengths only: odd ones get a masked padding token."""
    stand_in(_xla_for_cudnn)
    q, k, v = _qkv(jnp.float32, num_queries, num_keys, heads=3, dims=8, seed=1)
    got = cudnn_attention.fused_attention(q, k, v, 0.3)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) * 0.3
    want = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# (XLA:CPU cannot run JAX's float16 attention, the stand-in)
@pytest.mark.parametrize("num_queries, num_keys", [(64, 48), (33, 17), (2050, 8)])
def test_the_check_passes_a_kernel_that_computes_our_attention(
    stand_in, caplog, num_queries, num_keys
):
    stand_in(_xla_for_cudnn)
    shape = AttentionShape(num_queries, num_keys, 2, 16, 16, "bfloat16")
    with caplog.at_level(logging.INFO, logger=cudnn_attention.__name__):
        assert fused_attention_problem(shape) is None
    assert "cuDNN's fused attention checked on this device" in caplog.text


@pytest.mark.parametrize(
    "kernel, problem",
    [
        (_unsupported, "NotImplementedError: The head dim must be <= 128"),
        (_without_lengths, "its inference output is"),  # only odd lengths pad
        (_wrong_scale, "its inference output is"),
        (_wrong_gradients, "its dq is"),
        (_wrong_when_training, "its output is"),
    ],
)
def test_the_check_refuses_a_kernel_that_fails_or_computes_something_else(
    stand_in, caplog, kernel, problem
):
    stand_in(kernel)
    shape = AttentionShape(33, 17, 1, 256, 256, "bfloat16")
    with caplog.at_level(logging.WARNING, logger=cudnn_attention.__name__):
        assert problem in fused_attention_problem(shape)
    assert "XLA's instead of cuDNN's fused attention for 33 queries, 17 keys" in caplog.text
    assert "MCIBI_ATTENTION=xla skips this check" in caplog.text
    q, k, v = _qkv(jnp.bfloat16, 33, 17, dims=256)
    assert not cudnn_attention.use_fused_attention(q, k, v, backend="gpu")


def test_the_check_runs_once_per_shape_also_inside_a_traced_step(monkeypatch, stand_in):
    """The model decides while jit traces it: the check runs on the device there, once per
    attention shape, whatever the batch size; the step then computes with the checked kernel."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return _xla_for_cudnn(*args, **kwargs)

    stand_in(counted)
    monkeypatch.setattr(cudnn_attention.jax, "default_backend", lambda: "gpu")

    def loss(q, k, v):
        return dot_product_attention(q, k, v, 0.25).astype(jnp.float32).sum()

    rng = np.random.default_rng(2)
    for batch in (2, 3):
        q, k, v = (jnp.asarray(rng.normal(size=(batch, 20, 16)), jnp.bfloat16) for _ in range(3))
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        assert all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)
    checks = [shape for shape in calls if shape[0] == 1]
    assert len(checks) == 2  # the check's one image, with and without a backward pass, once
    assert any(shape[0] == 2 for shape in calls) and any(shape[0] == 3 for shape in calls)


def test_the_accelerator_benchmark_names_the_attention_taken(monkeypatch):
    accelerator = load_script("benchmarks", "accelerator")
    monkeypatch.setattr(
        cudnn_attention,
        "_checked",
        {
            AttentionShape(8192, 8192, 1, 256, 256, "bfloat16"): None,
            AttentionShape(1025, 1025, 16, 64, 64, "bfloat16"): "NotImplementedError: no",
        },
    )
    note = accelerator._attention_note()
    assert note == (
        "attention 8192x8192x1x256: cuDNN; attention 1025x1025x16x64: XLA (NotImplementedError: no)"
    )
    row = {
        "config": "configs/cityscapes.py:r50",
        "work": "train step",
        "dtype": "bfloat16",
        "size": [512, 1024],
        "images": 2,
        "compile_s": 40.0,
        "step_s": 0.05,
        "images_per_s": 40.0,
        "memory_source": "device",
        "peak_bytes": 2**32,
        "flops": 8.8e12,
        "tflops_per_s": 176.0,
        "mfu": 0.178,
        "overrides": ["model.remat=True"],
        "attention": note,
    }
    assert accelerator.format_row(row)[-1] == f"model.remat=True, {note}"
