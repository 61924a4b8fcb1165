"""Building blocks shared by the backbones and the head (NHWC everywhere).

Module names mirror the released PyTorch ``state_dict`` layout (``"0"``, ``"1"`` for
the members of a ``nn.Sequential``), so that porting a checkpoint is a renaming of
leaves: see ``mcibi_jax.porting.mapping``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mcibi_jax.models.conv import Conv

Array = jax.Array
Dtype = Any


def compute_dtype(dtype: Dtype) -> Dtype:
    """The dtype for statistics, softmaxes and losses: at least float32 (float64 stays)."""
    return jnp.promote_types(dtype, jnp.float32)


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
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            wide = x.astype(compute_dtype(x.dtype))
            mean = jnp.mean(wide, axes)
            var = jnp.mean(jnp.square(wide - mean), axes)
            if not self.is_initializing():
                count = x.size // features
                # PyTorch keeps the unbiased batch variance in its running statistics.
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        offset = bias - mean * multiplier
        dtype = self.dtype or x.dtype
        return (x * multiplier.astype(dtype) + offset.astype(dtype)).astype(dtype)


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
            self.features, self.kernel_size, stride=self.stride, dilation=self.dilation,
            padding=self.padding, use_bias=self.use_bias, name="0", dtype=self.dtype,
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


def max_pool_3x3_s2(x: Array) -> Array:
    """``nn.MaxPool2d(3, stride=2, padding=1)`` (padding never wins the max)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


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
