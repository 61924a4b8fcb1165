"""Sliding-window, multi-scale and flip inference against the reference's full test pipeline."""

from __future__ import annotations

import numpy as np
import pytest

import mcibi_jax
from mcibi_jax.evaluation.tta import tta_scores, window_starts
from mcibi_jax.reference_config import model_config_from_reference
from tests.reference_data import FIXTURES, model_cases, nhwc, read_case, relative_error

TTA_CASES = [c for c in model_cases() if "tta_scores_nchw" in read_case(c)[1]]


def test_some_fixture_has_a_tta_case():
    assert TTA_CASES


@pytest.mark.parametrize("case", TTA_CASES)
def test_tta_matches_the_reference(case):
    meta, arrays = read_case(case)
    model_config = model_config_from_reference(meta["reference_config"])
    segmenter = mcibi_jax.Segmenter.from_pth(FIXTURES / f"{case}.pth", model_config)
    scores = np.asarray(
        tta_scores(
            segmenter.model,
            segmenter.variables,
            nhwc(arrays["tta_images_nchw"]),
            model_config.inference.to_dict(),
            align_corners=model_config.align_corners,
        )
    )
    want = nhwc(arrays["tta_scores_nchw"])
    assert scores.shape == want.shape
    assert relative_error(scores, want) < 1e-4, relative_error(scores, want)
    assert (scores.argmax(-1) == arrays["tta_pred"]).mean() >= 0.999


def test_window_starts_cover_the_image_and_end_flush():
    assert window_starts(83, 64, 32) == [0, 19]
    assert window_starts(121, 48, 32) == [0, 32, 64, 73]
    assert window_starts(40, 64, 32) == [0]


def test_flip_pairs_permutation():
    from mcibi_jax.evaluation.tta import _swap_permutation

    assert list(_swap_permutation(5, [(1, 3)])) == [0, 3, 2, 1, 4]
