"""Winograd F(2x2, 3x3) convs (models/winograd.py) compute lax.conv's numbers, values and
gradients, and the reference fixtures hold when every eligible conv takes that route."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models import conv, winograd
from tests import test_reference_fixtures as fixtures
from tests.reference_data import read_case
from tests.test_conv import assert_conv_equals_lax_with_vjp, reference_conv

# (H, W, C, O, kernel, stride, dilation, padding): R-50's and HRNet's 3x3 convs (dilation 1, 2,
# 4), odd sizes that leave partial tiles, no padding, and a map smaller than a tile's span.
CASES = [
    (9, 7, 6, 5, 3, 1, 1, 1),
    (8, 8, 4, 4, 3, 1, 1, 0),
    (13, 12, 6, 5, 3, 1, 2, 2),
    (13, 11, 6, 5, 3, 1, 4, 4),
    (5, 5, 2, 3, 3, 1, 3, 3),
]


def winograd_route(x, kernel, strides, padding, dilation):
    assert winograd.supports(kernel.shape, strides, padding, dilation, 1)
    return winograd.winograd_conv(x, kernel, padding, dilation[0])


@pytest.mark.parametrize("case", CASES)
def test_winograd_conv_matches_lax_conv_values_and_gradients(case):
    assert_conv_equals_lax_with_vjp(winograd_route, case, seed=5)


def test_uneven_padding():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 10, 9, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    padding = ((0, 3), (4, 1))
    want, want_vjp = jax.vjp(lambda a, b: reference_conv(a, b, (1, 1), padding, (2, 2)), x, kernel)
    got, got_vjp = jax.vjp(lambda a, b: winograd.winograd_conv(a, b, padding, 2), x, kernel)
    cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for g, w in zip((got, *got_vjp(cotangent)), (want, *want_vjp(cotangent))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_dispatch_rule():
    cpu = jax.default_backend() == "cpu"
    wide, same = (3, 3, 512, 512), ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    x = (1, 64, 64, 512)
    assert conv.use_winograd(x, jnp.float32, wide, *same) == cpu
    assert conv.use_winograd(x, jnp.float32, wide, (1, 1), ((4, 4), (4, 4)), (4, 4), 1) == cpu
    assert not conv.use_winograd(x, jnp.bfloat16, wide, *same)
    assert not conv.use_winograd(x, jnp.float32, (3, 3, 64, 64), *same)  # the stems: XLA's
    assert not conv.use_winograd(x, jnp.float32, (1, 1, 512, 512), *same)
    assert not conv.use_winograd(x, jnp.float32, wide, (2, 2), ((1, 1), (1, 1)), (1, 1), 1)
    assert not conv.use_winograd(x, jnp.float32, (3, 3, 256, 512), *same[:3], 2)
    # ASPP's dilations stay per-tap matmuls
    assert not conv.use_winograd(x, jnp.float32, wide, (1, 1), ((12, 12), (12, 12)), (12, 12), 1)
    assert not winograd.supports(wide, (1, 1), ((3, 3), (3, 3)), (1, 1), 1)  # padding > 2 d
    assert not winograd.supports(wide, (1, 1), ((2, 2), (1, 1)), (2, 1), 1)


def _cases_of(backbone: str) -> list[str]:
    return [
        name
        for name in fixtures.CASES
        if read_case(name)[0]["reference_config"]["backbone"]["type"] == backbone
    ]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Winograd route is CPU-only")
# Winograd's forward: one ResNet case, and every HRNet one (their float32 gradients are the most
# ill-conditioned); the taps' forward (the same backward pass), one HRNet case
@pytest.mark.parametrize(
    "name, forward",
    [(name, "winograd") for name in _cases_of("ResNet")[:1] + _cases_of("HRNet")]
    + [(name, "taps on small maps") for name in _cases_of("HRNet")[:1]],
)
def test_fixtures_hold_with_winograd_on_every_eligible_conv(name, forward, monkeypatch):
    """The fixtures' narrow models have no conv wide enough for the route: lower the width
    threshold so that every 3x3 stride-1 conv outside ASPP takes it, forward and backward, with
    Winograd's forward pass or (every map counted small) the taps' one."""
    calls = []
    route = "winograd_conv" if forward == "winograd" else "small_map_conv"
    module = conv.winograd if forward == "winograd" else conv
    original = getattr(module, route)

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(conv, "MIN_WINOGRAD_CHANNELS", 1)
    monkeypatch.setattr(conv, "MAX_DIRECT_FORWARD_PIXELS", 0 if forward == "winograd" else 10**9)
    monkeypatch.setattr(module, route, counted)
    case = fixtures.load_case(name)
    fixtures.test_eval_logits(case)
    assert calls, f"no conv took the {route} route"
    fixtures.test_training_step(case)


@pytest.mark.parametrize("case", CASES + [(4, 4, 6, 5, 3, 1, 1, 0)])
def test_small_map_conv_matches_lax_conv_values_and_gradients(case):
    """Taps forward, Winograd backward."""
    assert_conv_equals_lax_with_vjp(
        lambda x, k, strides, padding, dilation: conv.small_map_conv(x, k, padding, dilation),
        case,
        seed=7,
    )


def test_small_maps_take_the_taps_forward():
    """Up to ``MAX_DIRECT_FORWARD_PIXELS`` pixels, nine tap matmuls; above, Winograd's 16."""
    if jax.default_backend() != "cpu":
        pytest.skip("the Winograd route is CPU-only")
    x = jnp.ones((1, 16, 16, 128))
    kernel = jnp.ones((3, 3, 128, 128))
    args = ((1, 1), ((1, 1), (1, 1)), (1, 1))
    small = jax.make_jaxpr(lambda a, b: conv.conv2d(a, b, *args))(x, kernel)
    large = jax.make_jaxpr(lambda a, b: conv.conv2d(a, b, *args))(
        jnp.ones((1, 32, 32, 128)), kernel
    )
    assert str(small).count("dot_general") == 9
    assert str(large).count("dot_general") != 9
