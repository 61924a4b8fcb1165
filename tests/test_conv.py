"""The CPU routes of models/conv.py (per-tap matmuls, matmul gradients, one conv per group)
compute lax.conv's numbers, values and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.conv import (
    DILATED_CONV_ENV,
    MIN_STRIDED_TAP_FORWARD_CHANNELS,
    MIN_TAP_GRAD_CHANNELS,
    MIN_WINOGRAD_GRAD_CHANNELS,
    Conv,
    axis_taps,
    conv2d,
    dilated_conv_method,
    matmul_grad_conv,
    pointwise_conv,
    space_to_batch_conv,
    strided_tap_conv,
    subgrid_grad_conv,
    tap_conv,
    use_matmul_grads,
    use_pointwise_matmul,
    use_strided_taps,
    use_tap_matmuls,
)
from tests.helpers import jaxpr_equations


def reference_conv(x, kernel, strides, padding, dilation, groups=1):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )


# (H, W, C, O, kernel, stride, dilation, padding): every combination the five backbones and the
# head use (ResNet stems and stages, ASPP dilations, HRNet's strided 3x3, ResNeSt's avg-down 1x1,
# the 7x7 stem), on odd sizes, plus maps smaller than the dilation (taps that read padding only).
CASES = [
    (9, 7, 6, 5, 1, 1, 1, 0),
    (9, 7, 6, 5, 1, 2, 1, 0),
    (9, 7, 6, 5, 3, 1, 1, 1),
    (9, 7, 6, 5, 3, 2, 1, 1),
    (9, 8, 6, 5, 3, 1, 4, 4),
    (11, 10, 3, 4, 7, 2, 1, 3),
    (13, 12, 6, 5, 3, 1, 12, 12),
    (13, 12, 6, 5, 3, 1, 36, 36),
    (40, 40, 6, 5, 3, 1, 36, 36),
    (6, 6, 6, 5, 3, 1, 6, 6),
    (8, 8, 6, 5, 3, 2, 1, 0),
]


def assert_conv_equals_lax_with_vjp(conv, case, seed):
    """conv's output and its vjp for a random cotangent equal lax.conv's (float32 rounding)."""
    h, w, c, o, k, s, d, p = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c, o)), jnp.float32)
    args = ((s, s), ((p, p), (p, p)), (d, d))
    out_shape = jax.eval_shape(lambda: reference_conv(x, kernel, *args)).shape
    cotangent = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    @jax.jit
    def value_and_grads(a, b):
        want, want_vjp = jax.vjp(lambda a, b: reference_conv(a, b, *args), a, b)
        got, got_vjp = jax.vjp(lambda a, b: conv(a, b, *args), a, b)
        return (got, *got_vjp(cotangent)), (want, *want_vjp(cotangent))

    for got, want in zip(*value_and_grads(x, kernel)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_tap_conv_matches_lax_conv_values_and_gradients(case):
    assert_conv_equals_lax_with_vjp(tap_conv, case, seed=0)


# (H, W, C, O, kernel, stride, dilation, padding): 1x1 convs (input gradient as a matmul when
# stride 1), k x k ones with few input channels (XLA's kernel gradient), narrow 3x3 stride-1 ones
# (Winograd's kernel gradient; odd sizes, no padding, dilated) and ones with many (taps).
MATMUL_GRAD_CASES = [
    (9, 7, 6, 5, 1, 1, 1, 0),
    (9, 7, 6, 5, 1, 2, 1, 0),
    (9, 7, 6, 5, 3, 1, 1, 1),
    (9, 7, MIN_WINOGRAD_GRAD_CHANNELS, 5, 3, 1, 1, 1),
    (8, 10, MIN_WINOGRAD_GRAD_CHANNELS, 6, 3, 1, 1, 0),
    (11, 9, MIN_WINOGRAD_GRAD_CHANNELS, 4, 3, 1, 2, 2),
    (6, 5, MIN_TAP_GRAD_CHANNELS, 4, 3, 1, 1, 1),
    (7, 6, MIN_TAP_GRAD_CHANNELS, 4, 3, 2, 1, 1),
    (9, 8, MIN_TAP_GRAD_CHANNELS, 4, 3, 1, 2, 2),
    (9, 8, MIN_TAP_GRAD_CHANNELS, 4, 1, 1, 1, 0),
]


@pytest.mark.parametrize("case", MATMUL_GRAD_CASES)
def test_matmul_grad_conv_matches_lax_conv_values_and_gradients(case):
    assert_conv_equals_lax_with_vjp(matmul_grad_conv, case, seed=4)


# (H, W, C, O, kernel, stride, dilation, padding): strided convs, forward by XLA's conv (narrow)
# and by the taps (wide), odd and even sizes, uneven strides' remainders, a dilated one.
STRIDED_CASES = [
    (9, 7, 6, 5, 3, 2, 1, 1),
    (8, 8, 6, 5, 3, 2, 1, 0),
    (11, 10, 3, 4, 7, 2, 1, 3),
    (9, 8, MIN_STRIDED_TAP_FORWARD_CHANNELS, 5, 3, 2, 1, 1),
    (10, 9, MIN_STRIDED_TAP_FORWARD_CHANNELS, 5, 3, 3, 1, 1),
    (11, 11, MIN_STRIDED_TAP_FORWARD_CHANNELS, 4, 3, 2, 2, 2),
]


@pytest.mark.parametrize("case", STRIDED_CASES)
def test_strided_tap_conv_matches_lax_conv_values_and_gradients(case):
    assert_conv_equals_lax_with_vjp(strided_tap_conv, case, seed=6)


def test_strided_tap_route_rule():
    cpu = jax.default_backend() == "cpu"
    wide = (3, 3, MIN_TAP_GRAD_CHANNELS, 8)
    assert use_strided_taps(jnp.float32, wide, (2, 2), 1) == cpu
    assert not use_strided_taps(jnp.float32, wide, (1, 1), 1)
    assert not use_strided_taps(jnp.float32, (3, 3, 3, 64), (2, 2), 1)  # stems: XLA's conv
    assert not use_strided_taps(jnp.float32, (1, 1, 256, 8), (2, 2), 1)  # 1x1: one matmul
    assert not use_strided_taps(jnp.bfloat16, wide, (2, 2), 1)
    assert not use_strided_taps(jnp.float32, wide, (2, 2), 2)


@pytest.mark.parametrize("case", [c for c in CASES if c[4] == 1] + [(8, 9, 6, 5, 1, 3, 1, 0)])
def test_pointwise_conv_matches_lax_conv_values_and_gradients(case):
    """1x1 convs as one matmul, strided ones on odd and even sizes included."""
    assert_conv_equals_lax_with_vjp(
        lambda x, k, strides, padding, dilation: pointwise_conv(x, k, strides), case, seed=5
    )


def test_pointwise_route_rule():
    cpu = jax.default_backend() == "cpu"
    none = ((0, 0), (0, 0))
    assert use_pointwise_matmul(jnp.float32, (1, 1, 64, 8), none, 1) == cpu
    assert not use_pointwise_matmul(jnp.float32, (1, 1, 64, 8), ((1, 1), (1, 1)), 1)
    assert not use_pointwise_matmul(jnp.float32, (3, 3, 64, 8), none, 1)
    assert not use_pointwise_matmul(jnp.bfloat16, (1, 1, 64, 8), none, 1)
    assert not use_pointwise_matmul(jnp.float32, (1, 1, 32, 8), none, 2)


def test_tap_conv_is_exact_in_float64():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((1, 10, 9, 4)))
        kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 3)))
        args = ((1, 1), ((12, 12), (12, 12)), (12, 12))
        np.testing.assert_allclose(
            tap_conv(x, kernel, *args), reference_conv(x, kernel, *args), rtol=1e-12, atol=1e-12
        )


def test_dead_taps_are_skipped():
    # dilation 36 on a 32-pixel axis: only the centre tap reads the input
    out, taps = axis_taps(32, 3, 1, 36, (36, 36))
    assert out == 32 and [t.index for t in taps] == [1]
    out, taps = axis_taps(64, 3, 1, 36, (36, 36))
    assert [(t.index, t.first_input, t.first_output, t.count) for t in taps] == [
        (0, 0, 36, 28),
        (1, 0, 0, 64),
        (2, 36, 0, 28),
    ]


@pytest.mark.parametrize("case", [c for c in CASES if c[5] == 1 and c[6] > 1])
def test_space_to_batch_conv_matches_lax_conv_values_and_gradients(case):
    def conv(x, kernel, strides, padding, dilation):
        return space_to_batch_conv(x, kernel, padding, dilation, precision="highest")

    assert_conv_equals_lax_with_vjp(conv, case, seed=3)


@pytest.mark.parametrize("padding", [((2, 2), (4, 4)), ((0, 3), (1, 0))])
def test_space_to_batch_conv_uneven_dilation_padding_and_groups(padding):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 15, 11, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
    want = reference_conv(x, kernel, (1, 1), padding, (2, 4), groups=2)
    got = space_to_batch_conv(x, kernel, padding, (2, 4), groups=2, precision="highest")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c[5] == 1 and c[6] > 1])
def test_subgrid_grad_conv_matches_lax_conv_values_and_gradients(case):
    def conv(x, kernel, strides, padding, dilation):
        return subgrid_grad_conv(x, kernel, padding, dilation, 1, "highest")

    assert_conv_equals_lax_with_vjp(conv, case, seed=5)


@pytest.mark.parametrize("padding", [((2, 2), (4, 4)), ((0, 3), (1, 0))])
def test_subgrid_grad_conv_uneven_dilation_padding_and_groups(padding):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 15, 11, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)

    def pulled_back(conv):
        out, vjp = jax.vjp(conv, x, kernel)
        return out, *vjp(jnp.cos(out))

    want = pulled_back(lambda a, b: reference_conv(a, b, (1, 1), padding, (2, 4), groups=2))
    got = pulled_back(lambda a, b: subgrid_grad_conv(a, b, padding, (2, 4), 2, "highest"))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def _conv_window_strides(fn, *args) -> list[tuple[int, ...]]:
    return [
        e.params["window_strides"]
        for e in jaxpr_equations(jax.make_jaxpr(fn)(*args))
        if e.primitive.name == "conv_general_dilated"
    ]


def test_subgrid_grad_makes_no_strided_kernel_gradient_conv():
    """The point of subgrid_grad_conv: JAX's kernel gradient of a dilated conv is a conv with
    window strides = the dilation (XLA:GPU then misses cuDNN's backward-filter conv); ours has
    only stride-1 convs."""
    x = jnp.ones((2, 16, 24, 8), jnp.bfloat16)
    kernel = jnp.ones((3, 3, 8, 4), jnp.bfloat16)
    args = (((12, 12), (12, 12)), (12, 12))

    def kernel_grad(conv):
        return jax.grad(lambda k, a: conv(a, k).astype(jnp.float32).sum())

    xla = kernel_grad(lambda a, k: reference_conv(a, k, (1, 1), *args))
    ours = kernel_grad(lambda a, k: subgrid_grad_conv(a, k, *args, 1, None))
    assert (12, 12) in _conv_window_strides(xla, kernel, x)
    assert set(_conv_window_strides(ours, kernel, x)) == {(1, 1)}


def test_custom_gradients_trace_no_dead_forward_pass():
    """Each custom backward pass takes its gradients by transposing (``linear_grad``), not
    through ``jax.vjp``, whose forward pass stayed in the step's jaxpr as dead code: one
    forward conv (or set of tap matmuls) more per gradient, which FLOP counts counted."""
    x = jnp.ones((2, 16, 24, 8))
    kernel = jnp.ones((3, 3, 8, 4))
    padding, dilation = ((2, 2), (2, 2)), (2, 2)

    def products(conv) -> list[str]:
        grad = jax.grad(lambda a, k: conv(a, k).sum(), (0, 1))
        names = ("conv_general_dilated", "dot_general")
        eqns = jaxpr_equations(jax.make_jaxpr(grad)(x, kernel))
        return [e.primitive.name for e in eqns if e.primitive.name in names]

    # forward, input gradient, kernel gradient
    assert (
        products(lambda a, k: subgrid_grad_conv(a, k, padding, dilation, 1, None))
        == ["conv_general_dilated"] * 3
    )
    strided = products(lambda a, k: strided_tap_conv(a, k, (2, 2), ((1, 1), (1, 1)), (1, 1)))
    # 8 input channels: XLA's forward conv, then one matmul per tap for each gradient
    assert strided == ["conv_general_dilated"] + ["dot_general"] * 2 * 9


def test_dilated_conv_method_from_the_environment(monkeypatch):
    monkeypatch.delenv(DILATED_CONV_ENV, raising=False)
    assert dilated_conv_method("cpu") == dilated_conv_method("tpu") == "xla"
    assert dilated_conv_method("gpu") == "subgrid_grad"
    monkeypatch.setenv(DILATED_CONV_ENV, "xla")
    assert dilated_conv_method("gpu") == "xla"
    monkeypatch.setenv(DILATED_CONV_ENV, "subgrid_grad")
    assert dilated_conv_method("cpu") == "subgrid_grad"
    x = jnp.ones((1, 9, 9, 4), jnp.bfloat16)  # bfloat16: not a CPU float32 path
    kernel = jnp.ones((3, 3, 4, 2), jnp.bfloat16)
    assert set(
        _conv_window_strides(
            jax.grad(
                lambda b, a: conv2d(a, b, (1, 1), ((2, 2), (2, 2)), (2, 2)).astype(float).sum()
            ),
            kernel,
            x,
        )
    ) == {(1, 1)}
    monkeypatch.setenv(DILATED_CONV_ENV, "space_to_batch")
    assert dilated_conv_method() == "space_to_batch"
    jaxpr = str(
        jax.make_jaxpr(lambda a, b: conv2d(a, b, (1, 1), ((2, 2), (2, 2)), (2, 2)))(x, kernel)
    )
    assert "rhs_dilation=(1, 1)" in jaxpr and "transpose" in jaxpr
    monkeypatch.setenv(DILATED_CONV_ENV, "taps")
    jaxpr = str(
        jax.make_jaxpr(lambda a, b: conv2d(a, b, (1, 1), ((2, 2), (2, 2)), (2, 2)))(x, kernel)
    )
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr
    monkeypatch.setenv(DILATED_CONV_ENV, "winograd")
    with pytest.raises(ValueError, match="MCIBI_DILATED_CONV='winograd'"):
        dilated_conv_method()


@pytest.mark.parametrize("dilation,padding", [(2, 2), (12, 12), (3, 1)])
def test_dilated_taps_in_bfloat16_sum_in_float32(monkeypatch, dilation, padding):
    """``MCIBI_DILATED_CONV=taps`` on bfloat16 (the accelerator variant): values and gradients
    as close to float32 XLA conv's as XLA's own bfloat16 conv is (one rounding of a float32
    sum, not one per tap)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 14, 13, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 8)), jnp.float32) / 12
    args = ((1, 1), ((padding, padding), (padding, padding)), (dilation, dilation))
    cotangent = jnp.asarray(
        rng.standard_normal(jax.eval_shape(lambda: reference_conv(x, kernel, *args)).shape),
        jnp.float32,
    )

    def pulled_back(conv, dtype):
        out, vjp = jax.vjp(lambda a, b: conv(a, b, *args), x.astype(dtype), kernel.astype(dtype))
        return [np.asarray(t, np.float32) for t in (out, *vjp(cotangent.astype(dtype)))]

    truth = pulled_back(reference_conv, jnp.float32)
    xla_bf16 = pulled_back(reference_conv, jnp.bfloat16)
    monkeypatch.setenv(DILATED_CONV_ENV, "taps")
    taps_bf16 = pulled_back(lambda a, b, *rest: conv2d(a, b, *rest), jnp.bfloat16)
    for got, xla, want in zip(taps_bf16, xla_bf16, truth):
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1.5 * np.abs(xla - want).max() + 1e-3 * scale


def test_dispatch_rule():
    cpu = jax.default_backend() == "cpu"
    x = (1, 32, 32, 64)
    one = ((1, 1), ((0, 0), (0, 0)), (1, 1))
    assert not use_tap_matmuls(x, jnp.float32, (1, 1, 64, 8), *one, 1)  # precision, see conv.py
    assert not use_tap_matmuls(x, jnp.float32, (3, 3, 64, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert (
        use_tap_matmuls(x, jnp.float32, (3, 3, 64, 8), (1, 1), ((12, 12), (12, 12)), (12, 12), 1)
        == cpu
    )
    assert not use_tap_matmuls(x, jnp.bfloat16, (1, 1, 64, 8), *one, 1)
    assert not use_tap_matmuls(x, jnp.float32, (1, 1, 32, 8), *one, 2)
    assert use_matmul_grads(jnp.float32, 1) == cpu
    assert not use_matmul_grads(jnp.bfloat16, 1)
    assert not use_matmul_grads(jnp.float32, 2)


@pytest.mark.parametrize("groups,dilation", [(1, 12), (4, 2)])
def test_conv2d_any_route_matches_lax(groups, dilation):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 8 // groups, 4)), jnp.float32)
    args = ((1, 1), ((dilation, dilation), (dilation, dilation)), (dilation, dilation))
    f = jax.jit(lambda a, b: conv2d(a, b, *args, groups=groups))
    np.testing.assert_allclose(
        f(x, kernel), reference_conv(x, kernel, *args, groups=groups), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("strides,dilation", [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (2, 2))])
def test_grouped_conv_equals_xla_grouped_conv_with_gradients(strides, dilation):
    """On CPU a grouped conv runs as one conv per group (ResNeSt's radix-2 convs)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 10, 11, 12)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)
    padding = tuple((d, d) for d in dilation)

    def loss(conv):
        def f(a, b):
            y = conv(a, b)
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, ours), ours_grads = loss(lambda a, b: conv2d(a, b, strides, padding, dilation, groups=3))(
        x, kernel
    )
    (_, want), want_grads = loss(lambda a, b: reference_conv(a, b, strides, padding, dilation, 3))(
        x, kernel
    )
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours_grads, want_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_conv_module_has_nn_conv_parameters_and_initialisation():
    x = jnp.ones((1, 6, 6, 4))
    kwargs = dict(
        features=3, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=True
    )
    ours = Conv(**kwargs).init(jax.random.key(0), x)
    flax = nn.Conv(**kwargs).init(jax.random.key(0), x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, flax)
    np.testing.assert_allclose(
        Conv(**kwargs).apply(ours, x), nn.Conv(**kwargs).apply(flax, x), rtol=1e-6, atol=1e-6
    )
