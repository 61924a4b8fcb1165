"""cuDNN's fused (flash) attention on GPUs, taken where it is checked to compute our attention.

On GPUs, XLA's attention writes each similarity matrix to memory and reads it back: the memory
head's 8192x8192 per image and block in a Cityscapes crop, ViT-L's 16 heads of 1025x1025 per
layer. cuDNN's fused kernel never stores them (R-50's H100 train-step roofline: 11 % shorter,
ViT-L's 38 %; docs/benchmarks.md).

``MCIBI_ATTENTION`` (environment, read when a model is traced) picks the attention:

* ``auto`` (the default): on GPUs, for bfloat16 and float16 operands, cuDNN's attention once it
  has passed :func:`fused_attention_problem` for the shape at hand: it runs on the device, forward
  and backward, and must be as close to float32 attention as XLA's attention in the same dtype.
  Where it fails (an older GPU or cuDNN, a head width it does not take, wrong numbers), XLA's
  attention, with a warning saying why;
* ``cudnn``: cuDNN's attention on GPUs for 16-bit operands, unchecked (errors surface);
* ``xla``: XLA's attention everywhere.

CPUs, TPUs and float32 always take XLA's attention.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ATTENTION_ENV = "MCIBI_ATTENTION"
ATTENTION_METHODS = ("auto", "xla", "cudnn")
# The check runs at these lengths at most (the parity kept: odd lengths take another path). cuDNN
# tiles the sequences, so longer ones run the same kernel on more tiles.
MAX_CHECK_LENGTH = 1024
# The check's tolerance: cuDNN's results may be this many times as far from float32 attention as
# XLA's attention in the same dtype is (whose error is 0.2-0.7 % of the largest value in
# bfloat16), plus this fraction of the largest value. Wrong masks, scales or layouts are off by
# far more.
CHECK_ERROR_RATIO = 3.0
CHECK_ERROR_FLOOR = 2e-3
# What the check compares: the output without and with a backward pass, and the gradients.
RESULTS = ("inference output", "output", "dq", "dk", "dv")

log = logging.getLogger(__name__)


def attention_method() -> str:
    """``MCIBI_ATTENTION``: ``auto`` (unset or empty), ``xla`` or ``cudnn``."""
    value = os.environ.get(ATTENTION_ENV, "").strip() or "auto"
    if value not in ATTENTION_METHODS:
        raise ValueError(
            f"{ATTENTION_ENV}={value!r}: expected one of {', '.join(ATTENTION_METHODS)}"
        )
    return value


def fused_attention_applies(dtype: Any, backend: str | None = None) -> bool:
    """Whether cuDNN's attention can be asked for: a GPU (``backend`` defaults to
    ``jax.default_backend()``) and bfloat16 or float16 operands."""
    backend = backend or jax.default_backend()
    return backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


class AttentionShape(NamedTuple):
    """What the check of cuDNN's attention depends on (the batch size is not part of it)."""

    num_queries: int
    num_keys: int
    heads: int
    head_dims: int
    value_dims: int
    dtype: str


# What fused_attention_problem found, shape by shape, in this process (also its cache).
_checked: dict[AttentionShape, str | None] = {}


def checked_attention() -> dict[AttentionShape, str | None]:
    """The shapes :func:`fused_attention_problem` has checked in this process, each with None
    (cuDNN's attention taken) or the problem found (XLA's)."""
    return dict(_checked)


def use_fused_attention(query: Array, key: Array, value: Array, backend: str | None = None) -> bool:
    """(N, Q, H, D), (N, K, H, D), (N, K, H, Dv): whether to take :func:`fused_attention` under
    ``MCIBI_ATTENTION`` (see the module's docstring). Static: shapes, dtype, backend."""
    method = attention_method()
    if method == "xla" or not fused_attention_applies(query.dtype, backend):
        return False
    if method == "cudnn":
        return True
    shape = AttentionShape(
        query.shape[1],
        key.shape[1],
        query.shape[2],
        query.shape[3],
        value.shape[3],
        jnp.dtype(query.dtype).name,
    )
    return fused_attention_problem(shape) is None


def fused_attention(query: Array, key: Array, value: Array, scale: float) -> Array:
    """(N, Q, H, D), (N, K, H, D), (N, K, H, Dv) -> (N, Q, H, Dv): ``softmax(scale * q k^T) v``
    per head as cuDNN's fused attention (GPUs, 16-bit operands).

    JAX's cuDNN attention takes only even lengths in training: an odd one (ViT's 1024 patches
    and class token) gets one padding token, masked out by the sequence lengths, then cut off.
    """
    n, num_queries, num_keys = query.shape[0], query.shape[1], key.shape[1]
    if num_queries % 2 == 0 and num_keys % 2 == 0:
        return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation="cudnn")

    def even(x: Array) -> Array:
        return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))

    out = jax.nn.dot_product_attention(
        even(query),
        even(key),
        even(value),
        scale=scale,
        query_seq_lengths=jnp.full((n,), num_queries, jnp.int32),
        key_value_seq_lengths=jnp.full((n,), num_keys, jnp.int32),
        implementation="cudnn",
    )
    return out[:, :num_queries]


def plain_attention(query: Array, key: Array, value: Array, scale: float) -> Array:
    """:func:`fused_attention`'s function as XLA computes ours: logits in the operands' dtype,
    the softmax in float32, its probabilities in the values' dtype for the product."""
    precision = jax.lax.Precision.HIGHEST if query.dtype == jnp.float32 else None
    logits = jnp.einsum("nqhd,nkhd->nhqk", query, key, precision=precision)
    weights = jax.nn.softmax(logits.astype(jnp.float32) * scale, axis=-1).astype(value.dtype)
    return jnp.einsum("nhqk,nkhd->nqhd", weights, value, precision=precision)


def _check_length(length: int) -> int:
    return length if length <= MAX_CHECK_LENGTH + 1 else MAX_CHECK_LENGTH + length % 2


def fused_attention_problem(shape: AttentionShape) -> str | None:
    """None where cuDNN's attention computes our attention at ``shape`` on this device, else
    what went wrong. Run once per shape (then cached), on the device, also while a model is
    being traced: random operands of one image (lengths above :data:`MAX_CHECK_LENGTH` cut to
    it), the output (with and without a backward pass) and the three gradients. Each must be at most :data:`CHECK_ERROR_RATIO` times as
    far from float32 attention of the same (rounded) operands as XLA's attention in
    ``shape.dtype`` is, plus :data:`CHECK_ERROR_FLOOR` of its largest value."""
    if shape in _checked:
        return _checked[shape]
    dtype = jnp.dtype(shape.dtype)
    num_queries, num_keys = _check_length(shape.num_queries), _check_length(shape.num_keys)
    rng = np.random.default_rng(0)

    def operand(length: int, dims: int) -> np.ndarray:
        return rng.standard_normal((1, length, shape.heads, dims)).astype(dtype)

    operands = (
        operand(num_queries, shape.head_dims),
        operand(num_keys, shape.head_dims),
        operand(num_keys, shape.value_dims),
        operand(num_queries, shape.value_dims),  # the output's cotangent
    )
    scale = shape.head_dims**-0.5

    def output_and_gradients(attention):
        # the output without a backward pass too: cuDNN builds another graph for inference
        def run(query, key, value, cotangent):
            out, vjp = jax.vjp(lambda *qkv: attention(*qkv, scale), query, key, value)
            return (attention(query, key, value, scale), out, *vjp(cotangent))

        return jax.jit(run)

    try:
        with jax.ensure_compile_time_eval():
            fused = output_and_gradients(fused_attention)(*operands)
            xla = output_and_gradients(plain_attention)(*operands)
            exact = output_and_gradients(plain_attention)(*(x.astype(np.float32) for x in operands))
            fused, xla, exact = (
                [np.asarray(x, np.float32) for x in results] for results in (fused, xla, exact)
            )
    except Exception as error:  # noqa: BLE001 - any failure means: not this kernel
        first_line = (str(error).strip().splitlines() or [""])[0]
        problem = f"{type(error).__name__}: {first_line[:300]}"
    else:
        problem = None
        for name, got, ours, want in zip(RESULTS, fused, xla, exact):
            largest = float(np.max(np.abs(want)))
            error, xla_error = np.max(np.abs(got - want)), np.max(np.abs(ours - want))
            if not error <= CHECK_ERROR_RATIO * xla_error + CHECK_ERROR_FLOOR * largest:  # NaNs too
                problem = (
                    f"its {name} is {error:.3g} from float32 attention's (XLA's in "
                    f"{dtype.name}: {xla_error:.3g}; largest value {largest:.3g})"
                )
                break
    where = (
        f"{shape.num_queries} queries, {shape.num_keys} keys, {shape.heads} head(s) of "
        f"{shape.head_dims} in {dtype.name}"
    )
    if problem is None:
        log.info("attention: cuDNN's fused attention checked on this device for %s", where)
    else:
        log.warning(
            "attention: XLA's instead of cuDNN's fused attention for %s (%s); "
            "%s=xla skips this check",
            where,
            problem,
            ATTENTION_ENV,
        )
    _checked[shape] = problem
    return problem
