"""Building blocks shared by the backbones and the head (NHWC everywhere).

Module names mirror the released PyTorch ``state_dict`` layout (``"0"``, ``"1"`` for
the members of a ``nn.Sequential``), so that porting a checkpoint is a renaming of
leaves: see ``mcibi_jax.porting.mapping``.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcibi_jax.models.conv import Conv

Array = jax.Array
Dtype = Any


def size_limit(env: str, default: int, unit: str) -> int:
    """A size limit from the environment variable ``env`` (a count of ``unit``; 0: no limit,
    i.e. ``sys.maxsize``), else ``default``; ValueError naming the variable if it is no number."""
    value = os.environ.get(env, "").strip()
    if not value:
        return default
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{env}={value!r}: expected a number of {unit} (0: no limit)") from None
    return limit if limit > 0 else sys.maxsize


def balanced_parts(length: int, max_part: int) -> tuple[int, int]:
    """``(parts, part)``: the fewest parts of at most ``max_part`` items that cover ``length``,
    all of one size ``part``, the least padding (``parts * part - length``)."""
    parts = math.ceil(length / max_part)
    return parts, math.ceil(length / parts)


def accumulation_dtype(dtype: Dtype) -> Dtype:
    """The dtype for statistics, softmaxes and losses: at least float32 (float64 stays)."""
    return jnp.promote_types(dtype, jnp.float32)


def is_narrow(dtype: Dtype) -> bool:
    """bfloat16 or float16: values whose own rounding dwarfs float32's."""
    return jnp.finfo(dtype).bits < 32


def product_precision(*operands: Array) -> jax.lax.Precision | None:
    """``Precision.HIGHEST`` for matrix products of float32 (or wider) operands: true float32
    products on accelerators, as the reference's. None for bfloat16 ones, where it would ask
    for nothing more and XLA:TPU's kernels reject it."""
    return None if is_narrow(jnp.result_type(*operands)) else jax.lax.Precision.HIGHEST


def softmax(logits: Array) -> Array:
    """Softmax over the last axis, computed in :func:`accumulation_dtype`."""
    return jax.nn.softmax(logits.astype(accumulation_dtype(logits.dtype)), axis=-1)


class BatchNorm(nn.Module):
    """Batch normalisation over every axis but the last, with PyTorch's semantics.

    In training the batch statistics of the (global, when sharded) batch normalise the
    input, and the running statistics move with PyTorch's ``momentum`` convention.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
        )
        if train:
            y, mean, var = batch_normalize(x, scale, bias, self.epsilon, self.dtype or x.dtype)
            if not self.is_initializing():
                count = x.size // features
                # PyTorch keeps the unbiased batch variance in its running statistics.
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (
                    1 - self.momentum
                ) * running_var.value + self.momentum * unbiased
            return y
        mean, var = running_mean.value, running_var.value
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        offset = bias - mean * multiplier
        dtype = self.dtype or x.dtype
        return (x * multiplier.astype(dtype) + offset.astype(dtype)).astype(dtype)


def two_pass_mean(x: Array, axes: tuple[int, ...]) -> Array:
    """Mean over ``axes`` (kept as size 1) with a correcting second pass over the shifted values.

    A float32 sum of many similar values drifts where PyTorch's CPU kernels accumulate in float64;
    ill-conditioned layers after the mean (BatchNorm over two samples) amplify the difference.
    """
    rough = jnp.mean(x, axes, keepdims=True)
    return rough + jnp.mean(x - rough, axes, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_normalize(
    x: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype
) -> tuple[Array, Array, Array]:
    """Training-mode batch normalisation over every axis but the last.

    Returns ``(y, mean, var)``: ``y`` like ``x`` (cast to ``dtype``), the batch mean and the biased
    batch variance, each ``(C,)`` in at least float32. The backward pass is PyTorch's closed form
    (``dy - mean(dy) - x_hat * mean(dy * x_hat)``): with a tiny batch variance, e.g. BatchNorm over
    two samples, autodiff of the forward formula loses far more float32 digits than it does.
    """
    return _batch_normalize_forward(x, scale, bias, epsilon, dtype)[0]


def _batch_normalize_forward(x, scale, bias, epsilon, dtype):
    if is_narrow(x.dtype):
        return _narrow_batch_normalize_forward(x, scale, bias, epsilon, dtype)
    axes = tuple(range(x.ndim - 1))
    wide = x.astype(accumulation_dtype(x.dtype))
    # A float32 sum of many similar values drifts (PyTorch accumulates in float64 on CPU): a second,
    # well-conditioned pass over the shifted values corrects the mean.
    rough_mean = jnp.mean(wide, axes)
    correction = jnp.mean(wide - rough_mean, axes)
    mean = rough_mean + correction
    centred = _centre(wide, rough_mean, correction)
    var = jnp.mean(jnp.square(centred), axes)
    inv_std = jax.lax.rsqrt(var + epsilon)
    # Centre before scaling, as PyTorch does: x * m - mean * m would cancel catastrophically.
    y = (centred * (scale * inv_std) + bias).astype(dtype)
    return (y, mean, var), (x, rough_mean, correction, inv_std, scale)


def _narrow_batch_normalize_forward(x, scale, bias, epsilon, dtype):
    """bfloat16/float16 inputs: both statistics from one float32 pass over ``x`` (the
    float32/float64 path reads it three times; on an accelerator each read of an activation
    costs as much as the arithmetic). The sums are over ``x`` minus one of its own samples per
    channel, a shift near the mean, so the variance keeps float32's digits, far more than the
    input has, unless that sample lies thousands of deviations away."""
    axes = tuple(range(x.ndim - 1))
    wide = x.astype(jnp.float32)
    shift = wide[(0,) * len(axes)]
    shifted = wide - shift
    offset = jnp.mean(shifted, axes)
    mean = shift + offset
    var = jnp.maximum(jnp.mean(jnp.square(shifted), axes) - jnp.square(offset), 0.0)
    inv_std = jax.lax.rsqrt(var + epsilon)
    y = ((wide - mean) * (scale * inv_std) + bias).astype(dtype)
    return (y, mean, var), (x, mean, jnp.zeros_like(mean), inv_std, scale)


def _centre(x: Array, rough_mean: Array, correction: Array) -> Array:
    # (x - rough) - correction keeps the digits that x - (rough + correction) would round away.
    return (x - rough_mean) - correction


def _batch_normalize_backward(epsilon, dtype, residuals, cotangents):
    del epsilon, dtype
    x, rough_mean, correction, inv_std, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    centred = _centre(x.astype(rough_mean.dtype), rough_mean, correction)
    x_hat = centred * inv_std
    dy = dy.astype(rough_mean.dtype)
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * x_hat, axes)
    direction = dy - dbias / count - x_hat * (dscale / count)
    # Exactly, the direction sums to zero over the batch (the output ignores a constant shift of x);
    # in float32 a residue remains, which the gradient of a layer before the BatchNorm multiplies
    # by its (possibly large, nearly constant) input. Centring once more removes it (not worth a
    # pass over the activations when dx is rounded to bfloat16, which leaves a far larger one).
    if not is_narrow(x.dtype):
        direction = direction - jnp.mean(direction, axes)
    dx = (scale * inv_std) * direction
    # The statistics are outputs too (the running averages read them); their cotangents are usually zero.
    dx = dx + dmean / count + dvar * (2.0 / count) * centred
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_normalize.defvjp(_batch_normalize_forward, _batch_normalize_backward)


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    padding: int | None = None,
    groups: int = 1,
    use_bias: bool = False,
    name: str | None = None,
    dtype: Dtype | None = None,
) -> Conv:
    """A conv (``nn.Conv``'s parameters; faster on CPU, see ``conv.py``) with PyTorch's
    explicit symmetric padding (default: 'same' for odd k)."""
    if padding is None:
        padding = dilation * (kernel_size - 1) // 2
    return Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        feature_group_count=groups,
        use_bias=use_bias,
        precision=jax.lax.Precision.HIGHEST if dtype in (None, jnp.float32, jnp.float64) else None,
        dtype=dtype,
        name=name,
    )


def hold_on_cpu(x: Array) -> Array:
    """``x`` held in memory on CPU, and so is its gradient.

    A residual stream read by every later block invites XLA:CPU to fuse each block's add (with
    its norm) into every later consumer (forward), and the gradient's sums over all later blocks,
    with their norms' backward, into every earlier consumer (backward), so that each block
    recomputes all the blocks before (after) it per element. Optimisation barriers do not stop
    it (XLA:CPU drops them before fusing), so ``x`` goes through a conditional, which JAX's
    autodiff mirrors in the backward pass (:func:`_fusion_boundary`). Measured (2-core AMD
    EPYC): ViT-L's 2x256x256 backbone, forward + backward, 13.2 -> 5.8 s; HRNet-W48's
    1x512x512 forward 3.4 -> 2.7 s. Other backends fuse by their own rules: ``x`` unchanged.
    """
    if jax.default_backend() != "cpu":
        return x
    return _fusion_boundary(x, jnp.isfinite(x.reshape(-1)[0]))


def _fusion_boundary(x: Array, flag: Array) -> Array:
    """``x`` through a conditional whose predicate is known only at run time: XLA cannot fuse
    across it (both branches return ``x``; ``flag`` is True unless the step is already NaN)."""
    return jax.lax.cond(flag, lambda v: v, lambda v: v + 0.0, x)


def residual_output(out: Array, identity: Array) -> Array:
    """ReLU(out + identity), a residual block's output (N, H, W, C), held in memory on CPU
    (:func:`hold_on_cpu`)."""
    return hold_on_cpu(nn.relu(out + identity))


def relu(x: Array, negative_slope: float = 0.0) -> Array:
    """ReLU, or LeakyReLU when ``negative_slope`` is set (the reference's LIP r50/r101 heads)."""
    return nn.relu(x) if negative_slope == 0.0 else nn.leaky_relu(x, negative_slope)


class ConvBNReLU(nn.Module):
    """Conv (``"0"``) -> BatchNorm (``"1"``) -> optional (leaky) ReLU, PyTorch's usual Sequential."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    dilation: int = 1
    padding: int | None = None
    use_bias: bool = False
    activate: bool = True
    negative_slope: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = conv(
            self.features,
            self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            padding=self.padding,
            use_bias=self.use_bias,
            name="0",
            dtype=self.dtype,
        )(x)
        x = BatchNorm(dtype=self.dtype, name="1")(x, train)
        return relu(x, self.negative_slope) if self.activate else x


class ChannelDropout(nn.Module):
    """``nn.Dropout2d``: drops whole channels of an (N, H, W, C) map."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not train or self.rate == 0.0:
            return x
        return nn.Dropout(self.rate, broadcast_dims=(1, 2), deterministic=False)(x)


@jax.custom_vjp
def max_pool_3x3_s2(x: Array) -> Array:
    """``nn.MaxPool2d(3, stride=2, padding=1)`` of x (N, H, W, C) (padding never wins the max).

    Its gradient goes to the first maximum of each window in row-major order, as JAX's and
    PyTorch's do, but is computed densely (:func:`_max_pool_grad`): JAX's is a select-and-scatter,
    which XLA:GPU runs as an arg-max reduction and a scatter-add.
    """
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _max_pool_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    y = max_pool_3x3_s2(x)
    return y, (x, y)


def _max_pool_grad(residuals: tuple[Array, Array], grad: Array) -> tuple[Array]:
    """Per window tap (row-major): the outputs whose maximum that tap holds, unless an earlier
    tap held it, pass their gradient back to the tap's pixels (placed with interior padding)."""
    x, y = residuals
    n, height, width, channels = x.shape
    out_h, out_w = y.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    taken = jnp.zeros(y.shape, bool)
    total = jnp.zeros(padded.shape, accumulation_dtype(grad.dtype))
    grad = grad.astype(total.dtype)
    zero = jnp.zeros((), total.dtype)
    for row in range(3):
        for col in range(3):
            window = jax.lax.slice(
                padded,
                (0, row, col, 0),
                (n, row + 2 * (out_h - 1) + 1, col + 2 * (out_w - 1) + 1, channels),
                (1, 2, 2, 1),
            )
            hit = (window == y) & ~taken
            taken = taken | hit
            spread = (
                (0, 0, 0),
                (row, height + 2 - row - 2 * (out_h - 1) - 1, 1),
                (col, width + 2 - col - 2 * (out_w - 1) - 1, 1),
                (0, 0, 0),
            )
            total = total + jax.lax.pad(jnp.where(hit, grad, zero), zero, spread)
    return (total[:, 1:-1, 1:-1, :].astype(x.dtype),)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_grad)


def avg_pool_ceil(x: Array, window: int, stride: int, padding: int = 0) -> Array:
    """``nn.AvgPool2d(window, stride, padding, ceil_mode=True, count_include_pad=False)``."""
    h, w = x.shape[1], x.shape[2]

    def extra(size):  # right padding that ceil_mode adds, minus windows starting in padding
        out = -(-(size + 2 * padding - window) // stride) + 1
        if (out - 1) * stride >= size + padding:
            out -= 1
        return max((out - 1) * stride + window - size - 2 * padding, 0) + padding

    pads = ((0, 0), (padding, extra(h)), (padding, extra(w)), (0, 0))
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pads)
    ones = jnp.ones((1, h, w, 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pads)
    return total / count
