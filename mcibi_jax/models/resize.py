"""Image resizing that reproduces ``torch.nn.functional.interpolate`` exactly.

``jax.image.resize`` antialiases when it downsamples and uses a different cubic
kernel, so the released models' numbers need our own kernels. Every mode is a
pair of small interpolation matrices applied along H and W, which lowers to two
matmuls (fast on TPU/GPU and differentiable).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax.models.layers import product_precision

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (Keys' kernel uses -0.5).


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the four taps at offsets -1, 0, 1, 2 for fractional positions t."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def interpolation_matrix(
    in_size: int,
    out_size: int,
    mode: str = "bilinear",
    align_corners: bool = False,
    scale_factor: float | None = None,
) -> np.ndarray:
    """Matrix M of shape (out_size, in_size) such that ``M @ x`` resizes x along one axis.

    ``scale_factor``, when given, is used for the source coordinates the way PyTorch
    does when ``interpolate`` is called with ``scale_factor`` (the output size being
    ``floor(in_size * scale_factor)``), instead of ``in_size / out_size``.
    """
    dst = np.arange(out_size, dtype=np.float64)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    if mode == "nearest":
        scale = (1.0 / scale_factor) if scale_factor else in_size / out_size
        src = np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)
        matrix[rows, src] = 1.0
        return matrix
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        scale = (1.0 / scale_factor) if scale_factor else in_size / out_size
        src = (dst + 0.5) * scale - 0.5
    if mode == "bilinear":
        if not align_corners:
            src = np.maximum(src, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        hi = np.minimum(lo + 1, in_size - 1)
        frac = src - lo
        np.add.at(matrix, (rows, lo), 1.0 - frac)
        np.add.at(matrix, (rows, hi), frac)
    elif mode == "bicubic":
        base = np.floor(src).astype(np.int64)
        weights = _cubic_weights(src - base)
        for tap in range(4):
            idx = np.clip(base - 1 + tap, 0, in_size - 1)
            np.add.at(matrix, (rows, idx), weights[:, tap])
    else:
        raise ValueError(f"unknown interpolation mode {mode!r}")
    return matrix


def resize(
    x: jnp.ndarray,
    size: Sequence[int],
    mode: str = "bilinear",
    align_corners: bool = False,
    scale_factor: float | None = None,
) -> jnp.ndarray:
    """Resizes ``x`` of shape (N, H, W, C) to (N, size[0], size[1], C) like PyTorch."""
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = x.shape[1], x.shape[2]
    if (out_h, out_w) == (in_h, in_w) and scale_factor in (None, 1, 1.0):
        return x
    mh = interpolation_matrix(in_h, out_h, mode, align_corners, scale_factor)
    mw = interpolation_matrix(in_w, out_w, mode, align_corners, scale_factor)
    if mode == "nearest":
        return _nearest(x, np.argmax(mh, axis=1), np.argmax(mw, axis=1))
    return resample(x, jnp.asarray(mh, x.dtype), jnp.asarray(mw, x.dtype))


def _nearest(x: jnp.ndarray, rows: np.ndarray, columns: np.ndarray) -> jnp.ndarray:
    """x (N, H, W, C) at the source rows and columns (index arrays) -> (N, H', W', C). Where
    both repeat each source index k times (an integer upsampling) it is a broadcast
    (:func:`_repeat_pixels`) instead of a gather, whose gradient is a scatter-add."""
    h, w = x.shape[1:3]
    kh, kw = len(rows) // h, len(columns) // w  # 0 when shrinking: then no index array matches
    if np.array_equal(rows, np.repeat(np.arange(h), kh)) and np.array_equal(
        columns, np.repeat(np.arange(w), kw)
    ):
        return _repeat_pixels(x, kh, kw)
    return x[:, rows][:, :, columns]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _repeat_pixels(x: jnp.ndarray, kh: int, kw: int) -> jnp.ndarray:
    """Each pixel of x (N, H, W, C) repeated into a kh x kw block: (N, H * kh, W * kw, C)."""
    n, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, kh, w, kw, c)).reshape(
        n, h * kh, w * kw, c
    )


def _repeat_pixels_fwd(x, kh, kw):
    return _repeat_pixels(x, kh, kw), None


def _repeat_pixels_bwd(kh, kw, _, grad):
    # The sum of each block as adds of strided slices: XLA:CPU fuses those into the producer,
    # where a reduce over the block axes became a YNNPACK fusion 10-40x slower (ViT-L's
    # auxiliary heads, 2x256x256x512: up to 0.5 s).
    n, hk, wk, c = grad.shape
    blocks = grad.reshape(n, hk // kh, kh, wk // kw, kw, c)
    rows = functools.reduce(jnp.add, [blocks[:, :, i] for i in range(kh)])
    return (functools.reduce(jnp.add, [rows[:, :, :, j] for j in range(kw)]),)


_repeat_pixels.defvjp(_repeat_pixels_fwd, _repeat_pixels_bwd)


def resample(x: jnp.ndarray, rows: jnp.ndarray, columns: jnp.ndarray) -> jnp.ndarray:
    """``rows @ x @ columns.T`` over the spatial axes: x (N, H, W, C), rows (H', H) and
    columns (W', W) interpolation matrices (see :func:`interpolation_matrix`) -> (N, H', W', C).
    ``rows`` may hold only some output rows (a band of them)."""
    precision = product_precision(rows, x)
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=precision)
    return jnp.einsum("pw,nowc->nopc", columns, x, precision=precision)


def scaled_size(size: Sequence[int], scale_factor: float) -> tuple[int, int]:
    """Output size of PyTorch's ``interpolate(scale_factor=...)``: floor of each side."""
    return tuple(int(math.floor(s * scale_factor)) for s in size)  # type: ignore[return-value]
