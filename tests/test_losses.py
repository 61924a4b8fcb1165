"""cross_entropy's program: the same numbers as a gather of the label's log-probability, without
a scatter in its gradient (a scatter-add runs on atomics on GPUs); the loss of upsampled logits
in bands of label rows: the same numbers as on the whole upsampled map."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.models.resize import resize
from mcibi_jax.train import losses
from mcibi_jax.train.losses import cross_entropy, upsampled_cross_entropy


def gathered_cross_entropy(logits, labels, ignore_label):
    valid = labels != ignore_label
    in_range = valid & (labels >= 0) & (labels < logits.shape[-1])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, jnp.where(in_range, labels, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(in_range, nll, 0.0)) / jnp.sum(valid)


def test_cross_entropy_equals_the_gather_and_its_gradient_has_no_scatter():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 6, 7, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(-1, 7, (2, 6, 7)), jnp.int32)  # -1, 5, 6: out of range
    labels = labels.at[0, 0, 0].set(255)

    got, got_grad = jax.value_and_grad(cross_entropy)(logits, labels, 255)
    want, want_grad = jax.value_and_grad(gathered_cross_entropy)(logits, labels, 255)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(got_grad, want_grad)

    jaxpr = str(jax.make_jaxpr(jax.grad(cross_entropy))(logits, labels, 255))
    assert "scatter" not in jaxpr and "gather" not in jaxpr


def whole_map_loss(logits, labels, ignore_label, num_replicas, align_corners):
    upsampled = resize(logits, labels.shape[1:3], "bilinear", align_corners)
    return cross_entropy(upsampled, labels, ignore_label, num_replicas)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("band_elements", [1, 7 * 23 * 5, 3 * 23 * 5 + 1])
def test_loss_in_bands_of_rows_equals_the_whole_map(band_elements, align_corners):
    # 37 label rows of 23 pixels, 5 classes: bands of 1 row, 7 rows (the last padded: 6 bands
    # of 7 for 37 rows) and 3 rows; 4 images in 2 replicas, one of whose bands has no valid pixel
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 5, 3, 5)) * 3, jnp.float32)
    labels = rng.integers(0, 5, (4, 37, 23))
    labels[rng.random(labels.shape) < 0.2] = 255
    labels[1, :10] = 255
    labels[2, 3, 4] = 7  # out of range: zero loss, counted
    labels = jnp.asarray(labels, jnp.int16)
    args = (labels, 255, 2, align_corners)
    want, want_grad = jax.value_and_grad(whole_map_loss)(logits, *args)
    got, got_grad = jax.value_and_grad(upsampled_cross_entropy)(logits, *args, band_elements)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=0, atol=2e-6 * np.abs(want_grad).max())

    # above the limit the bands are a loop whose backward pass recomputes them; not below
    def gradient_program(limit):
        loss = functools.partial(upsampled_cross_entropy, max_band_elements=limit)
        return str(jax.make_jaxpr(jax.grad(lambda x: loss(x, *args)))(logits))

    assert "scan" not in gradient_program(10**9)
    program = gradient_program(band_elements)
    assert "scan" in program and "scatter" not in program


def test_loss_band_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv(losses.LOSS_BAND_ENV, raising=False)
    assert losses.loss_band_limit() > 10**15  # on CPUs
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert losses.loss_band_limit() == losses.MAX_LOSS_BAND_ELEMENTS
    monkeypatch.setenv(losses.LOSS_BAND_ENV, "0")
    assert losses.loss_band_limit() > 10**15
    monkeypatch.setenv(losses.LOSS_BAND_ENV, "many")
    with pytest.raises(ValueError, match="MCIBI_LOSS_BAND_ELEMENTS='many'"):
        losses.loss_band_limit()


def test_loss_of_logits_at_the_label_size_recomputes_instead_of_banding():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((2, 9, 4, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, (2, 9, 4)), jnp.int32)
    want, want_grad = jax.value_and_grad(cross_entropy)(logits, labels, 255, 2)
    loss = functools.partial(upsampled_cross_entropy, max_band_elements=12)
    got, got_grad = jax.value_and_grad(loss)(logits, labels, 255, 2)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_grad, want_grad)
    program = str(jax.make_jaxpr(jax.grad(lambda x: loss(x, labels, 255, 2)))(logits))
    assert "remat" in program and "scan" not in program and "dot_general" not in program
