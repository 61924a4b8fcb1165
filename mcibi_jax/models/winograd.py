"""Stride-1 3x3 convolution by Winograd's minimal filtering F(2x2, 3x3), dilation included.

Each 2x2 block of outputs needs 16 multiplications per channel pair instead of 36, so the
conv becomes 16 matmuls of (output pixels / 4, C) x (C, O): 2.25x fewer FLOPs than the conv.
The input and kernel transforms only add, subtract and halve, and the sums run in another
order than XLA's conv, so values agree with it to float32 rounding (about 1e-6 relative).
XLA:CPU's matmuls run near the core's peak where its convs do not (docs/benchmarks.md), so on
CPU this is how :func:`mcibi_jax.models.conv.conv2d` runs wide 3x3 convs in float32.

A dilated conv (dilation d) is the same algorithm on the input's d x d interleaved sub-grids:
output rows ``2 d t + rho`` and ``2 d t + d + rho`` (``rho < d``) read input rows
``2 d t + rho + {0, d, 2 d, 3 d}``, so one reshape of the padded rows to (tiles, 2, d) gives
all four without a gather.

The backward pass keeps only the input and the kernel: the input's gradient is again a
Winograd conv (of the output gradient with the flipped, transposed kernel) and the kernel's
gradient 16 matmuls over the tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST

# The kernel transform G (4x3) of F(2, 3); its 2-D form G (x) G maps the 9 taps to 16 terms.
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)
_KERNEL_TRANSFORM = np.kron(_G, _G)  # (16, 9): [4 a + b, 3 i + j]
# Input and output channels transformed and multiplied at a time: the transformed tiles,
# kernel and products of a chunk are what the route adds to a step's memory.
CHANNEL_CHUNK = 512


def _tiles(size: int, low: int, high: int, dilation: int) -> tuple[int, int]:
    """(output size, tiles of 2 * dilation outputs) along one axis."""
    out = size + low + high - 2 * dilation
    return out, -(-out // (2 * dilation))


def _geometry(x_shape, padding, dilation: int) -> tuple[int, int, int, int]:
    """(out_h, out_w, tiles_h, tiles_w)."""
    (out_h, tiles_h), (out_w, tiles_w) = (
        _tiles(x_shape[1 + axis], *padding[axis], dilation) for axis in range(2)
    )
    return out_h, out_w, tiles_h, tiles_w


def _input_taps(x: Array, axis: int, dilation: int, tiles: int) -> list[Array]:
    """The four input rows of every tile along ``axis`` (padded to (tiles + 1) * 2 * d there):
    each with ``axis`` split into (tiles, d)."""
    shape = x.shape
    split = x.reshape(shape[:axis] + (tiles + 1, 2, dilation) + shape[axis + 1 :])

    def take(first_tile: int, half: int) -> Array:
        rows = jax.lax.index_in_dim(split, half, axis + 1, keepdims=False)
        return jax.lax.slice_in_dim(rows, first_tile, first_tile + tiles, axis=axis)

    x0, x1, x2, x3 = take(0, 0), take(0, 1), take(1, 0), take(1, 1)
    # B^T of F(2, 3)
    return [x0 - x2, x1 + x2, x2 - x1, x1 - x3]


def input_transform(
    x: Array, padding: tuple[tuple[int, int], tuple[int, int]], dilation: int
) -> tuple[Array, tuple[int, int, int, int]]:
    """x (N, H, W, C) -> (16, P, C) transformed tiles, and (out_h, out_w, tiles_h, tiles_w);
    P = N * tiles_h * d * tiles_w * d."""
    n, height, width, channels = x.shape
    (top, bottom), (left, right) = padding
    out_h, tiles_h = _tiles(height, top, bottom, dilation)
    out_w, tiles_w = _tiles(width, left, right, dilation)
    span = 2 * dilation
    x = jnp.pad(
        x,
        (
            (0, 0),
            (top, (tiles_h + 1) * span - height - top),
            (left, (tiles_w + 1) * span - width - left),
            (0, 0),
        ),
    )
    # Materialising the row stage halves XLA:CPU's time for the whole transform (measured).
    rows = jax.lax.optimization_barrier(jnp.stack(_input_taps(x, 1, dilation, tiles_h)))
    tiles = jnp.stack(_input_taps(rows, 4, dilation, tiles_w), axis=1)
    return tiles.reshape(16, -1, channels), (out_h, out_w, tiles_h, tiles_w)


def kernel_transform(kernel: Array) -> Array:
    """(3, 3, C, O) -> (16, C, O)."""
    _, _, c, o = kernel.shape
    transform = jnp.asarray(_KERNEL_TRANSFORM, kernel.dtype)
    return jnp.dot(transform, kernel.reshape(9, c * o), precision=_HIGHEST).reshape(16, c, o)


def _output_transform(products: Array, n: int, geometry, dilation: int) -> Array:
    """(16, P, O) -> (N, out_h, out_w, O): A^T of F(2, 3) along both axes, tiles back in place."""
    out_h, out_w, tiles_h, tiles_w = geometry
    d = dilation
    m = products.reshape(4, 4, n, tiles_h, d, tiles_w, d, -1)

    def a_t(m0, m1, m2, m3):
        return m0 + m1 + m2, m1 - m2 - m3

    cols = a_t(m[:, 0], m[:, 1], m[:, 2], m[:, 3])  # each (4, N, th, d, tw, d, O)
    y = jnp.stack([jnp.stack(a_t(c[0], c[1], c[2], c[3])) for c in cols], axis=1)
    # y: (row half, col half, N, th, d, tw, d, O) -> (N, th, row half, d, tw, col half, d, O)
    y = y.transpose(2, 3, 0, 4, 5, 1, 6, 7)
    y = y.reshape(n, tiles_h * 2 * d, tiles_w * 2 * d, -1)
    return y[:, :out_h, :out_w]


def _output_transform_transposed(grad: Array, geometry, dilation: int) -> Array:
    """The transpose of :func:`_output_transform`: (N, out_h, out_w, O) -> (16, P, O)."""
    out_h, out_w, tiles_h, tiles_w = geometry
    d = dilation
    n, _, _, o = grad.shape
    grad = jnp.pad(
        grad, ((0, 0), (0, tiles_h * 2 * d - out_h), (0, tiles_w * 2 * d - out_w), (0, 0))
    )
    g = grad.reshape(n, tiles_h, 2, d, tiles_w, 2, d, o).transpose(2, 5, 0, 1, 3, 4, 6, 7)

    def a(g0, g1):  # A of F(2, 3): the four products each output half came from
        return [g0, g0 + g1, g0 - g1, -g1]

    rows = a(g[0], g[1])  # each (col half, N, th, d, tw, d, O)
    tiles = jnp.stack([jnp.stack(a(r[0], r[1])) for r in rows])
    return tiles.reshape(16, -1, o)


def _batched_dot(a: Array, b: Array) -> Array:
    """(16, P, K) x (16, K, M) -> (16, P, M)."""
    return jax.lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), precision=_HIGHEST)


def _channel_chunks(channels: int, chunk: int = CHANNEL_CHUNK) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk, channels)) for lo in range(0, channels, chunk)]


def _forward(x: Array, kernel: Array, padding, dilation: int) -> Array:
    # The kernel's transform reads parameters only, and XLA computes such work early: every
    # conv's transformed kernel (16/9x the kernel) would be held from the start of the step
    # (+0.28 GiB for R-50's train step). The barrier ties it to the input.
    x, kernel = jax.lax.optimization_barrier((x, kernel))
    geometry = _geometry(x.shape, padding, dilation)
    outputs = []
    for out_lo, out_hi in _channel_chunks(kernel.shape[3]):
        products = None
        for lo, hi in _channel_chunks(x.shape[-1]):
            tiles, _ = input_transform(x[..., lo:hi], padding, dilation)
            chunk = _batched_dot(tiles, kernel_transform(kernel[:, :, lo:hi, out_lo:out_hi]))
            products = chunk if products is None else products + chunk
        outputs.append(_output_transform(products, x.shape[0], geometry, dilation))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def winograd_conv(
    x: Array, kernel: Array, padding: tuple[tuple[int, int], tuple[int, int]], dilation: int
) -> Array:
    """Stride-1 conv of x (N, H, W, C) with a 3x3 kernel (3, 3, C, O), ``padding`` ((top,
    bottom), (left, right)) of at most 2 * ``dilation`` each, the same ``dilation`` on both
    axes -> (N, H', W', O)."""
    return _forward(x, kernel, padding, dilation)


def _winograd_fwd(x, kernel, padding, dilation):
    return _forward(x, kernel, padding, dilation), (x, kernel)


def kernel_grad(
    x: Array, grad: Array, padding: tuple[tuple[int, int], tuple[int, int]], dilation: int
) -> Array:
    """The gradient of a stride-1 3x3 conv's kernel (3, 3, C, O) from its input x (N, H, W, C)
    and its output's gradient (N, H', W', O): 16 matmuls over the transformed tiles, then the
    kernel transform's transpose. On CPU it also serves convs too narrow for
    :func:`winograd_conv` (:func:`mcibi_jax.models.conv.matmul_grad_conv`)."""
    products_grad = _output_transform_transposed(
        grad, _geometry(x.shape, padding, dilation), dilation
    )
    transform = jnp.asarray(_KERNEL_TRANSFORM.T, grad.dtype)
    grad_kernel = []
    # Chunks of another width than the forward pass's: XLA would merge identical transforms
    # with the forward pass's (optimisation barriers do not stop it on CPU) and hold those tiles,
    # 4x every such conv's input, from the forward pass until here (+0.17 GiB for R-50's step).
    for lo, hi in _channel_chunks(x.shape[-1], max(1, min(CHANNEL_CHUNK, x.shape[-1]) // 2)):
        # The barrier keeps XLA from computing this transform before the output's gradient
        # exists, which would hold the tiles as long.
        x_chunk, _ = jax.lax.optimization_barrier((x[..., lo:hi], products_grad))
        tiles, _ = input_transform(x_chunk, padding, dilation)
        transformed_grad = jax.lax.dot_general(
            tiles, products_grad, (((1,), (1,)), ((0,), (0,))), precision=_HIGHEST
        )  # (16, hi - lo, O)
        chunk = jnp.dot(transform, transformed_grad.reshape(16, -1), precision=_HIGHEST)
        grad_kernel.append(chunk.reshape(3, 3, hi - lo, -1))
    return jnp.concatenate(grad_kernel, axis=2)


def _winograd_bwd(padding, dilation, residuals, grad):
    x, kernel = residuals
    return backward(x, kernel, grad, padding, dilation)


def backward(
    x: Array,
    kernel: Array,
    grad: Array,
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: int,
) -> tuple[Array, Array]:
    """The gradients (of x, of kernel) of :func:`winograd_conv` for its output's gradient."""
    span = 2 * dilation
    grad, kernel = jax.lax.optimization_barrier((grad, kernel))  # see _forward
    # The input gradient: the full correlation of grad with the flipped kernel, C and O swapped.
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    grad_padding = tuple((span - low, span - high) for low, high in padding)
    grad_x = _forward(grad, flipped, grad_padding, dilation)
    grad_kernel = kernel_grad(x, grad, padding, dilation)
    return grad_x.astype(x.dtype), grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)


def supports(kernel_shape, strides, padding, dilation, groups: int) -> bool:
    """Whether :func:`winograd_conv` computes this conv (3x3, stride 1, one dilation for both
    axes, ungrouped, padding at most 2 * dilation per side)."""
    d = dilation[0]
    return (
        tuple(kernel_shape[:2]) == (3, 3)
        and tuple(strides) == (1, 1)
        and dilation[0] == dilation[1]
        and groups == 1
        and all(0 <= p <= 2 * d for side in padding for p in side)
    )
