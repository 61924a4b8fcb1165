"""2-D convolution that, on CPU, runs parts of its work as matmuls instead of XLA's conv.

XLA:CPU's own convolution reaches about half the speed of its matmul on the released
models' shapes, and its weight gradient far less (a fifth for 1x1 convs with hundreds of
channels). So on CPU, in float32:

* 1x1 convs without padding (strided ones too) are one matmul over the (strided) pixels
  (:func:`pointwise_conv`), forward and backward;
* dilated convs whose taps mostly read padding (ASPP) run as one ``dot`` per kernel tap over
  the input pixels that tap actually reads (:func:`tap_conv`);
* wide 3x3 stride-1 convs (dilated or not) run as Winograd F(2x2, 3x3), 16 matmuls with 2.25x
  fewer FLOPs than the conv, forward and backward (:mod:`mcibi_jax.models.winograd`; on small
  maps the forward pass is one matmul per tap, :func:`small_map_conv`);
* wide strided convs take their backward pass (and, when wider still, their forward) as one
  matmul per kernel tap over the tap's strided window of the padded input
  (:func:`strided_tap_conv`);
* every other conv keeps XLA's conv forward, and its backward pass computes the kernel's
  gradient as per-tap matmuls or, for narrow 3x3 stride-1 convs, by Winograd's transforms (and a
  1x1 conv's input gradient as one matmul) (:func:`matmul_grad_conv`).

Both backward passes keep only the input and the kernel (like XLA's conv). Other backends
and dtypes use ``lax.conv_general_dilated``; on CPU a grouped conv is one conv per group.

Stride-1 dilated convs outside that CPU path follow ``MCIBI_DILATED_CONV`` (environment, read
when a model is traced; :func:`dilated_conv_method`). On GPUs the default keeps XLA's conv for
the forward pass and the input's gradient but takes the kernel's gradient on the input's
interleaved sub-grids (:func:`subgrid_grad_conv`): JAX writes a dilated conv's kernel gradient as
a conv with window *strides*, which XLA:GPU does not recognise as a cuDNN backward-filter conv
and runs as a forward conv whose "kernel" is the whole output gradient over 2 input channels
(the batch). ``space_to_batch`` runs the whole conv on the sub-grids (:func:`space_to_batch_conv`),
``taps`` as one matmul per kernel tap over the pixels it reads (:func:`tap_conv`, summed in
float32), and ``xla`` keeps XLA's conv and its gradients (the default elsewhere).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax.ad_checkpoint import checkpoint_name

from mcibi_jax.models import winograd

Array = jax.Array

DILATED_CONV_ENV = "MCIBI_DILATED_CONV"
DILATED_CONV_METHODS = ("auto", "xla", "subgrid_grad", "space_to_batch", "taps")

# From this dilation on, XLA:CPU's conv (and far more its gradient) is slower than the taps.
MIN_TAP_DILATION = 8
# Kernels of k x k > 1 with this many input channels or more get their gradient as tap matmuls
# (measured on XLA:CPU: 2x faster from 128 channels on, slower for the stems' 3 to 64).
MIN_TAP_GRAD_CHANNELS = 128
# 3x3 convs with this many input and output channels run as Winograd F(2x2, 3x3) on CPU; the
# stems' narrower ones are faster as XLA's conv.
MIN_WINOGRAD_CHANNELS = 128
# Winograd convs on maps of at most this many pixels (batch included) run forward as tap matmuls:
# the kernel's transform, read from memory each step, then outweighs the saved multiplications
# (HRNet-W48's 384-channel branch on 1x16x16: forward 1x512x512 1.85-1.93 -> 1.71-1.79 s). Their
# backward pass stays Winograd's (taps' made the train step no faster, on 2x8x8 and 2x16x16).
MAX_DIRECT_FORWARD_PIXELS = 256
# Narrower 3x3 stride-1 convs with this many input channels or more get their kernel's gradient
# from Winograd's transforms (HRNet's 48->48 on 2x64x64 5.4 -> 2.4 ms, 96->96 on 2x32x32 2.2 ->
# 1.5 ms); XLA's is as fast for 32 channels and faster below.
MIN_WINOGRAD_GRAD_CHANNELS = 32
# Strided k x k convs with this many input channels or more run forward as tap matmuls on CPU
# (HRNet's 3x3 720->720 stride 2 on 1x128x128: 315 -> 176 ms); XLA's conv is as fast or faster
# on the narrower ones (HRNet's exchange units, ResNet's stage-2 entry).
MIN_STRIDED_TAP_FORWARD_CHANNELS = 256
# Every conv's output carries this name, for remat policies that keep conv outputs only.
CONV_OUTPUT = "conv_output"


class Tap(NamedTuple):
    """One kernel offset along one spatial axis: kernel index, first input index, first
    output index and number of outputs that read inside the input."""

    index: int
    first_input: int
    first_output: int
    count: int


def axis_taps(
    size: int, kernel: int, stride: int, dilation: int, padding: tuple[int, int]
) -> tuple[int, list[Tap]]:
    """Output size and the taps along one axis that read at least one input (not padding)."""
    low, high = padding
    out = (size + low + high - dilation * (kernel - 1) - 1) // stride + 1
    taps = []
    for index in range(kernel):
        offset = index * dilation - low  # input index read by output 0
        first = max(0, -(offset // stride))  # smallest o with o * stride + offset >= 0
        last = min(out - 1, (size - 1 - offset) // stride)
        if first <= last:
            taps.append(Tap(index, first * stride + offset, first, last - first + 1))
    return out, taps


def use_tap_matmuls(
    x_shape: Sequence[int],
    x_dtype: Any,
    kernel_shape: Sequence[int],
    strides,
    padding,
    dilation,
    groups: int,
) -> bool:
    """Whether :func:`conv2d` takes the per-tap matmul path (static: shapes, dtype, backend).

    On CPU, float32, ungrouped, kernels larger than 1x1: when only one tap reads the input
    (dilated convs whose other taps read padding only: one matmul) or when the dilation is
    large. Measured on XLA:CPU (AVX2): XLA's own conv wins for dense 3x3 convs and loses
    1.5-25x on ASPP's dilated ones. 1x1 convs are not taps (see :func:`use_pointwise_matmul`).
    """
    if jax.default_backend() != "cpu" or groups != 1 or jnp.dtype(x_dtype) != jnp.float32:
        return False
    if tuple(kernel_shape[:2]) == (1, 1):
        return False
    _, _, taps = _plan(x_shape, kernel_shape, strides, padding, dilation)
    return len(taps) <= 1 or max(dilation) >= MIN_TAP_DILATION


def conv2d(
    x: Array,
    kernel: Array,
    strides: tuple[int, int] = (1, 1),
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    precision: Any = None,
) -> Array:
    """``lax.conv_general_dilated`` for x (N, H, W, C) and kernel (kh, kw, C / groups, O).

    On CPU in float32 computed as per-tap matmuls (:func:`use_tap_matmuls`) or as XLA's conv
    with matmul gradients (:func:`matmul_grad_conv`); values and gradients equal XLA's conv up
    to float32 rounding (the sums run in another order). On CPU a grouped conv is one conv per
    group.
    """
    strides, dilation = tuple(strides), tuple(dilation)
    padding = tuple(tuple(p) for p in padding)
    if groups > 1 and jax.default_backend() == "cpu":
        # XLA:CPU's grouped convolution runs 4-9x slower than one convolution per group
        # (ResNeSt's split-attention convs), with the same numbers.
        return jnp.concatenate(
            [
                conv2d(x_group, kernel_group, strides, padding, dilation, 1, precision)
                for x_group, kernel_group in zip(
                    jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1)
                )
            ],
            axis=-1,
        )
    if x.dtype == kernel.dtype and use_pointwise_matmul(x.dtype, kernel.shape, padding, groups):
        return pointwise_conv(x, kernel, strides, precision)
    if x.dtype == kernel.dtype and use_tap_matmuls(
        x.shape, x.dtype, kernel.shape, strides, padding, dilation, groups
    ):
        return tap_conv(x, kernel, strides, padding, dilation)
    if x.dtype == kernel.dtype and use_winograd(
        x.shape, x.dtype, kernel.shape, strides, padding, dilation, groups
    ):
        if _is_small_map(x.shape):
            return small_map_conv(x, kernel, padding, dilation)
        return winograd.winograd_conv(x, kernel, padding, dilation[0])
    if x.dtype == kernel.dtype and use_strided_taps(x.dtype, kernel.shape, strides, groups):
        return strided_tap_conv(x, kernel, strides, padding, dilation)
    if x.dtype == kernel.dtype and use_matmul_grads(x.dtype, groups):
        return matmul_grad_conv(x, kernel, strides, padding, dilation, precision)
    if strides == (1, 1) and dilation != (1, 1):
        method = dilated_conv_method()
        if method == "subgrid_grad":
            return subgrid_grad_conv(x, kernel, padding, dilation, groups, precision)
        if method == "space_to_batch":
            return space_to_batch_conv(x, kernel, padding, dilation, groups, precision)
        if method == "taps" and groups == 1 and x.dtype == kernel.dtype:
            return tap_conv(x, kernel, strides, padding, dilation)
    return xla_conv(x, kernel, strides, padding, dilation, groups, precision)


def use_pointwise_matmul(x_dtype: Any, kernel_shape: Sequence[int], padding, groups: int) -> bool:
    """Whether :func:`conv2d` takes :func:`pointwise_conv` (static): on CPU in float32, 1x1 convs
    without padding. Measured on XLA:CPU (2-core AMD EPYC), forward: 1x1 2048->512 on 1x64x64
    124 -> 45 ms as a matmul, 512->150 on 2x256x256 (ViT-L's auxiliary classifiers) 420 -> 147 ms;
    forward + backward never slower. Every training-step fixture holds with it on AVX2, AVX-512
    and AMX CPUs (an older 1x1 route, per-tap matmuls with their own gradients, did not on AMX).
    """
    return (
        use_matmul_grads(x_dtype, groups)
        and tuple(kernel_shape[:2]) == (1, 1)
        and all(tuple(p) == (0, 0) for p in padding)
    )


def pointwise_conv(x: Array, kernel: Array, strides=(1, 1), precision: Any = None) -> Array:
    """A 1x1 conv without padding as one matmul: x (N, H, W, C), kernel (1, 1, C, O) ->
    (N, ceil(H / stride), ceil(W / stride), O). Its gradients are matmuls too (autodiff)."""
    x = x[:, :: strides[0], :: strides[1]]
    n, h, w, c = x.shape
    y = jnp.dot(x.reshape(n * h * w, c), kernel.reshape(c, -1), precision=precision)
    return y.reshape(n, h, w, -1)


def use_winograd(
    x_shape: Sequence[int],
    x_dtype: Any,
    kernel_shape: Sequence[int],
    strides,
    padding,
    dilation,
    groups: int,
) -> bool:
    """Whether :func:`conv2d` takes :func:`winograd.winograd_conv` (static): on CPU in float32,
    3x3 stride-1 convs with at least ``MIN_WINOGRAD_CHANNELS`` input and output channels that
    the taps do not take (ASPP's). Measured on XLA:CPU (2-core AMD EPYC, R-50's shapes): 3x3
    2048->512 on 64x64 481 -> 265 ms, its backward pass at 2x32x32 499 -> 346 ms.
    """
    return (
        use_matmul_grads(x_dtype, groups)
        and min(kernel_shape[2], kernel_shape[3]) >= MIN_WINOGRAD_CHANNELS
        and winograd.supports(kernel_shape, strides, padding, dilation, groups)
        and not use_tap_matmuls(x_shape, x_dtype, kernel_shape, strides, padding, dilation, groups)
    )


def use_strided_taps(x_dtype: Any, kernel_shape: Sequence[int], strides, groups: int) -> bool:
    """Whether :func:`conv2d` takes :func:`strided_tap_conv` (static): on CPU in float32, strided
    k x k convs (k > 1) with at least ``MIN_TAP_GRAD_CHANNELS`` input channels. Measured on
    XLA:CPU (2-core Xeon), forward + backward: 3x3 720->720 stride 2 on 1x128x128 717 -> 434 ms,
    128->128 on 2x64x64 15 -> 9 ms; the stems' 3-channel ones are faster as XLA's.
    """
    return (
        use_matmul_grads(x_dtype, groups)
        and tuple(strides) != (1, 1)
        and tuple(kernel_shape[:2]) != (1, 1)
        and kernel_shape[2] >= MIN_TAP_GRAD_CHANNELS
    )


def _strided_taps(x: Array, kernel: Array, strides, padding, dilation) -> Array:
    """The conv as one matmul per tap over that tap's strided window of the padded input."""
    (sh, sw), (dh, dw), (kh, kw) = strides, dilation, kernel.shape[:2]
    x = jax.lax.pad(
        x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0))
    )
    n, height, width, channels = x.shape
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            window = jax.lax.slice(
                x,
                (0, i * dh, j * dw, 0),
                (n, i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1, channels),
                (1, sh, sw, 1),
            )
            y = _dot(window, kernel[i, j])
            out = y if out is None else out + y
    return out


def linear_grad(fn: Callable[[Array], Array], primal: Array, cotangent: Array) -> Array:
    """The gradient through ``fn``, linear in its argument, shaped like ``primal``: its
    transpose applied to ``cotangent``. Unlike ``jax.vjp``, this traces no forward pass, which
    the program would carry as dead code (and FLOP counts of its jaxpr would count)."""
    return jax.linear_transpose(fn, primal)(cotangent)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def strided_tap_conv(x: Array, kernel: Array, strides, padding, dilation) -> Array:
    """A strided conv whose backward pass is that of one matmul per kernel tap (over the tap's
    strided window of the padded input); its forward pass is those matmuls too from
    ``MIN_STRIDED_TAP_FORWARD_CHANNELS`` input channels on, XLA's conv below."""
    if x.shape[-1] >= MIN_STRIDED_TAP_FORWARD_CHANNELS:
        return _strided_taps(x, kernel, strides, padding, dilation)
    return xla_conv(x, kernel, strides, padding, dilation, precision=jax.lax.Precision.HIGHEST)


def _strided_tap_conv_fwd(x, kernel, strides, padding, dilation):
    return strided_tap_conv(x, kernel, strides, padding, dilation), (x, kernel)


def _strided_tap_conv_bwd(strides, padding, dilation, residuals, grad):
    x, kernel = residuals
    grad_x = linear_grad(lambda a: _strided_taps(a, kernel, strides, padding, dilation), x, grad)
    grad_kernel = linear_grad(
        lambda b: _strided_taps(x, b, strides, padding, dilation), kernel, grad
    )
    return grad_x, grad_kernel


strided_tap_conv.defvjp(_strided_tap_conv_fwd, _strided_tap_conv_bwd)


def _is_small_map(shape: Sequence[Any]) -> bool:
    """At most ``MAX_DIRECT_FORWARD_PIXELS`` pixels in (N, H, W); never for symbolic sizes (an
    exported function's batch)."""
    if not all(isinstance(d, int) for d in shape[:3]):
        return False
    return shape[0] * shape[1] * shape[2] <= MAX_DIRECT_FORWARD_PIXELS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def small_map_conv(x: Array, kernel: Array, padding, dilation) -> Array:
    """A Winograd-route conv (:func:`use_winograd`) on a small map: forward as one matmul per
    kernel tap, backward as :func:`winograd.backward`."""
    return _strided_taps(x, kernel, (1, 1), padding, dilation)


def _small_map_conv_fwd(x, kernel, padding, dilation):
    return small_map_conv(x, kernel, padding, dilation), (x, kernel)


def _small_map_conv_bwd(padding, dilation, residuals, grad):
    x, kernel = residuals
    return winograd.backward(x, kernel, grad, padding, dilation[0])


small_map_conv.defvjp(_small_map_conv_fwd, _small_map_conv_bwd)


def dilated_conv_method(backend: str | None = None) -> str:
    """How :func:`conv2d` runs stride-1 dilated convs outside the CPU float32 paths: the
    ``MCIBI_DILATED_CONV`` environment variable, one of ``auto`` (the default: ``subgrid_grad``
    on GPUs, ``xla`` elsewhere), ``xla``, ``subgrid_grad``, ``space_to_batch`` or ``taps``.
    ``backend`` defaults to ``jax.default_backend()``."""
    method = os.environ.get(DILATED_CONV_ENV) or "auto"
    if method not in DILATED_CONV_METHODS:
        raise ValueError(
            f"{DILATED_CONV_ENV}={method!r}: expected one of {', '.join(DILATED_CONV_METHODS)}"
        )
    if method == "auto":
        backend = backend or jax.default_backend()
        return "subgrid_grad" if backend in ("gpu", "cuda", "rocm") else "xla"
    return method


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def subgrid_grad_conv(
    x: Array,
    kernel: Array,
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    groups: int,
    precision: Any,
) -> Array:
    """XLA's stride-1 dilated conv of x (N, H, W, C), whose kernel gradient is the undilated
    kernel gradient of :func:`space_to_batch_conv` (the input's and the output gradient's
    interleaved sub-grids on the batch axis); the input's gradient is XLA's.

    The same sums as XLA's kernel gradient in another order. The point is the program it
    makes: a stride-1 undilated conv over a large "kernel" (the output gradient's sub-grids),
    which XLA:GPU's conv rewriter maps to cuDNN's backward-filter conv. JAX's own transpose
    of a dilated conv is a conv with window strides equal to the dilation, which that rewriter
    leaves as a forward conv: the output gradient of the whole map as its kernel and the
    batch, 2 images per device, as its input channels.
    """
    return xla_conv(x, kernel, (1, 1), padding, dilation, groups, precision)


def _subgrid_grad_conv_fwd(x, kernel, padding, dilation, groups, precision):
    return xla_conv(x, kernel, (1, 1), padding, dilation, groups, precision), (x, kernel)


def _subgrid_grad_conv_bwd(padding, dilation, groups, precision, residuals, grad):
    x, kernel = residuals
    grad_x = linear_grad(
        lambda x: xla_conv(x, kernel, (1, 1), padding, dilation, groups, precision), x, grad
    )
    grad_kernel = linear_grad(
        lambda k: space_to_batch_conv(x, k, padding, dilation, groups, precision), kernel, grad
    )
    return grad_x, grad_kernel


subgrid_grad_conv.defvjp(_subgrid_grad_conv_fwd, _subgrid_grad_conv_bwd)


def space_to_batch_conv(
    x: Array,
    kernel: Array,
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    groups: int = 1,
    precision: Any = None,
) -> Array:
    """A stride-1 conv with ``dilation`` (d_h, d_w) of x (N, H, W, C) as one undilated conv of
    the d_h * d_w interleaved sub-grids of the padded input (stacked on the batch axis).

    Output row o reads padded rows o + t * d_h; all of them share o's residue mod d_h, so each
    residue's rows form a plain conv. The padded input is extended to a multiple of the
    dilation (a few more zero rows and columns, whose outputs are cut off again).
    """
    (dh, dw), (kh, kw) = dilation, kernel.shape[:2]
    (top, bottom), (left, right) = padding
    n, height, width, channels = x.shape
    out_h = height + top + bottom - dh * (kh - 1)
    out_w = width + left + right - dw * (kw - 1)
    grid_h = -(-(height + top + bottom) // dh)  # padded rows per sub-grid
    grid_w = -(-(width + left + right) // dw)
    x = jnp.pad(
        x,
        (
            (0, 0),
            (top, grid_h * dh - height - top),
            (left, grid_w * dw - width - left),
            (0, 0),
        ),
    )
    x = x.reshape(n, grid_h, dh, grid_w, dw, channels).transpose(0, 2, 4, 1, 3, 5)
    y = xla_conv(
        x.reshape(n * dh * dw, grid_h, grid_w, channels),
        kernel,
        (1, 1),
        ((0, 0), (0, 0)),
        (1, 1),
        groups,
        precision,
    )
    rows, cols, features = y.shape[1:]
    y = y.reshape(n, dh, dw, rows, cols, features).transpose(0, 3, 1, 4, 2, 5)
    return y.reshape(n, rows * dh, cols * dw, features)[:, :out_h, :out_w]


def xla_conv(x, kernel, strides, padding, dilation, groups=1, precision=None) -> Array:
    """``lax.conv_general_dilated`` in NHWC / HWIO."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=precision,
    )


def use_matmul_grads(x_dtype: Any, groups: int) -> bool:
    """Whether :func:`conv2d` takes :func:`matmul_grad_conv` (CPU, float32, ungrouped)."""
    return jax.default_backend() == "cpu" and groups == 1 and jnp.dtype(x_dtype) == jnp.float32


def _plan(shape: Sequence[int], kernel_shape: Sequence[int], strides, padding, dilation):
    (out_h, rows), (out_w, cols) = (
        axis_taps(shape[1 + a], kernel_shape[a], strides[a], dilation[a], padding[a])
        for a in range(2)
    )
    return out_h, out_w, [(r, c) for r in rows for c in cols]


def _input_window(x: Array, r: Tap, c: Tap, strides) -> Array:
    """The (N, r.count, c.count, C) input pixels that taps (r, c) read."""
    (sh, sw) = strides
    return jax.lax.slice(
        x,
        (0, r.first_input, c.first_input, 0),
        (
            x.shape[0],
            r.first_input + (r.count - 1) * sh + 1,
            c.first_input + (c.count - 1) * sw + 1,
            x.shape[3],
        ),
        (1, sh, sw, 1),
    )


def _place(y: Array, r: Tap, c: Tap, out_h: int, out_w: int) -> Array:
    """(N, r.count, c.count, O) -> (N, out_h, out_w, O), zeros outside the tap's outputs."""
    zero = jnp.zeros((), y.dtype)
    return jax.lax.pad(
        y,
        zero,
        (
            (0, 0, 0),
            (r.first_output, out_h - r.first_output - r.count, 0),
            (c.first_output, out_w - c.first_output - c.count, 0),
            (0, 0, 0),
        ),
    )


def _dot(a: Array, b: Array, accumulate: Any = None) -> Array:
    return jax.lax.dot_general(
        a,
        b,
        (((a.ndim - 1,), (0,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=accumulate,
    )


def _sum_dtype(dtype: Any) -> Any:
    """Per-tap products are summed in at least float32 (bfloat16 taps: one rounding, as a conv)."""
    return jnp.promote_types(dtype, jnp.float32)


def _tap_conv_forward(x, kernel, strides, padding, dilation):
    out_h, out_w, taps = _plan(x.shape, kernel.shape, strides, padding, dilation)
    out = None
    for r, c in taps:
        y = _dot(_input_window(x, r, c, strides), kernel[r.index, c.index], _sum_dtype(x.dtype))
        if (r.count, c.count) != (out_h, out_w):
            y = _place(y, r, c, out_h, out_w)
        out = y if out is None else out + y
    if out is None:  # every tap reads padding only
        return jnp.zeros((x.shape[0], out_h, out_w, kernel.shape[3]), x.dtype)
    return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def tap_conv(x: Array, kernel: Array, strides, padding, dilation) -> Array:
    """The conv as per-tap matmuls (stride, padding and dilation static); any dtype."""
    return _tap_conv_forward(x, kernel, strides, padding, dilation)


def _tap_conv_fwd(x, kernel, strides, padding, dilation):
    return _tap_conv_forward(x, kernel, strides, padding, dilation), (x, kernel)


def _tap_kernel_grad(x, kernel_shape, grad, strides, padding, dilation):
    """The kernel's gradient, one matmul over the output pixels per tap."""
    _, _, taps = _plan(x.shape, kernel_shape, strides, padding, dilation)
    grad_kernel = jnp.zeros(kernel_shape, x.dtype)
    for r, c in taps:
        window, grad_window = _input_window(x, r, c, strides), _output_window(grad, r, c)
        # XLA:CPU copies the dot's left operand into (channels, pixels) order: give it the
        # narrower one (measured: 3x3 2560->512 933 -> 572 ms, 1x1 512->2048 115 -> 54 ms).
        if kernel_shape[2] >= kernel_shape[3]:
            tap_grad = _pixel_dot(grad_window, window).T
        else:
            tap_grad = _pixel_dot(window, grad_window)
        grad_kernel = grad_kernel.at[r.index, c.index].add(tap_grad)
    return grad_kernel


def _pixel_dot(a: Array, b: Array) -> Array:
    """(N, H, W, A), (N, H, W, B) -> (A, B), summed over the pixels."""
    return jnp.einsum("nhwa,nhwb->ab", a, b, precision=jax.lax.Precision.HIGHEST)


def _tap_input_grad(x_shape, kernel, grad, strides, padding, dilation):
    """The input's gradient, one matmul per tap placed back at the input pixels it read."""
    _, _, taps = _plan(x_shape, kernel.shape, strides, padding, dilation)
    (sh, sw) = strides
    grad_x = None
    for r, c in taps:
        gx = jax.lax.dot_general(
            _output_window(grad, r, c),
            kernel[r.index, c.index],
            (((3,), (1,)), ((), ())),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=_sum_dtype(grad.dtype),
        )
        # back to input positions: stride - 1 zeros between pixels, zeros around
        end_h = x_shape[1] - r.first_input - (r.count - 1) * sh - 1
        end_w = x_shape[2] - c.first_input - (c.count - 1) * sw - 1
        gx = jax.lax.pad(
            gx,
            jnp.zeros((), gx.dtype),
            ((0, 0, 0), (r.first_input, end_h, sh - 1), (c.first_input, end_w, sw - 1), (0, 0, 0)),
        )
        grad_x = gx if grad_x is None else grad_x + gx
    if grad_x is None:
        return jnp.zeros(x_shape, kernel.dtype)
    return grad_x.astype(grad.dtype)


def _output_window(grad: Array, r: Tap, c: Tap) -> Array:
    """The (N, r.count, c.count, O) outputs that taps (r, c) contribute to."""
    return jax.lax.slice(
        grad,
        (0, r.first_output, c.first_output, 0),
        (grad.shape[0], r.first_output + r.count, c.first_output + c.count, grad.shape[3]),
    )


def _tap_conv_bwd(strides, padding, dilation, residuals, grad):
    x, kernel = residuals
    grad_x = _tap_input_grad(x.shape, kernel, grad, strides, padding, dilation)
    grad_kernel = _tap_kernel_grad(x, kernel.shape, grad, strides, padding, dilation)
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def matmul_grad_conv(x: Array, kernel: Array, strides, padding, dilation, precision=None) -> Array:
    """XLA's conv, whose backward pass computes the kernel's gradient as per-tap matmuls
    (1x1 kernels, or k x k ones with at least ``MIN_TAP_GRAD_CHANNELS`` input channels) or, for
    narrower 3x3 stride-1 ones (from ``MIN_WINOGRAD_GRAD_CHANNELS``), by Winograd's transforms
    (:func:`winograd.kernel_grad`), and a 1x1 stride-1 conv's input gradient as one matmul; the
    rest of it is XLA's.

    Measured on XLA:CPU (2-core Xeon, R-50's train-step shapes, the input an elementwise
    function of another array as in the network): the kernel gradient of a 1x1 2048->512 conv
    364 -> 49 ms, of a 3x3 2560->512 one 1644 -> 572 ms (docs/benchmarks.md).
    """
    return xla_conv(x, kernel, strides, padding, dilation, precision=precision)


def _matmul_grad_conv_fwd(x, kernel, strides, padding, dilation, precision):
    return xla_conv(x, kernel, strides, padding, dilation, precision=precision), (x, kernel)


def _matmul_grad_conv_bwd(strides, padding, dilation, precision, residuals, grad):
    x, kernel = residuals
    pointwise = kernel.shape[:2] == (1, 1)
    if pointwise and strides == (1, 1):
        grad_x = _tap_input_grad(x.shape, kernel, grad, strides, padding, dilation)
    else:
        grad_x = linear_grad(
            lambda x: xla_conv(x, kernel, strides, padding, dilation, precision=precision), x, grad
        )
    if pointwise or kernel.shape[2] >= MIN_TAP_GRAD_CHANNELS:
        grad_kernel = _tap_kernel_grad(x, kernel.shape, grad, strides, padding, dilation)
    elif kernel.shape[2] >= MIN_WINOGRAD_GRAD_CHANNELS and winograd.supports(
        kernel.shape, strides, padding, dilation, 1
    ):
        grad_kernel = winograd.kernel_grad(x, grad, padding, dilation[0])
    else:
        grad_kernel = linear_grad(
            lambda k: xla_conv(x, k, strides, padding, dilation, precision=precision), kernel, grad
        )
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


matmul_grad_conv.defvjp(_matmul_grad_conv_fwd, _matmul_grad_conv_bwd)


class Conv(nn.Module):
    """``flax.linen.Conv`` for 2-D NHWC inputs with explicit padding, through :func:`conv2d`.

    Same parameters (``kernel`` (kh, kw, C / groups, features), ``bias``), initialisers and
    dtype promotion as ``nn.Conv``, so checkpoints and random initialisation are unchanged.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    kernel_dilation: tuple[int, int] = (1, 1)
    feature_group_count: int = 1
    use_bias: bool = True
    precision: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, H', W', features)."""
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"{in_features} input channels do not split into {self.feature_group_count} groups"
            )
        shape = (*self.kernel_size, in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(
            x,
            kernel,
            self.strides,
            self.padding,
            self.kernel_dilation,
            self.feature_group_count,
            self.precision,
        )
        if bias is not None:
            y = y + bias.reshape(1, 1, 1, -1)
        return checkpoint_name(y, CONV_OUTPUT)
