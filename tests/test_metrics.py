"""Confusion-matrix metrics on hand-computed cases."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from mcibi_jax.evaluation.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    format_table,
    segmentation_metrics,
    to_json,
)


def test_hand_computed_case_with_absent_class_and_ignore():
    predictions = np.array([[0, 1], [1, 2]])
    labels = np.array([[0, 1], [2, -100]])
    counts = np.asarray(confusion_matrix(predictions, labels, num_classes=4))
    expected = np.zeros((4, 4), int)
    expected[0, 0] = expected[1, 1] = expected[2, 1] = (
        1  # the ignored pixel (predicted 2) is not counted
    )
    np.testing.assert_array_equal(counts, expected)

    m = segmentation_metrics(counts)
    # I = [1, 1, 0, 0], GT area = [1, 1, 1, 0], predicted area = [1, 2, 0, 0], union = [1, 2, 1, 0]
    np.testing.assert_allclose(m["IoU"][:3], [1.0, 0.5, 0.0])
    assert math.isnan(m["IoU"][3])  # absent from both: excluded from the mean
    assert m["mIoU"] == pytest.approx(0.5)
    np.testing.assert_allclose(m["Acc"][:3], [1.0, 1.0, 0.0])
    assert math.isnan(m["Acc"][3])
    assert m["mAcc"] == pytest.approx(2 / 3)
    assert m["aAcc"] == pytest.approx(2 / 3)


def test_class_predicted_but_absent_from_ground_truth():
    # class 2 only predicted: IoU 0 (counts toward mIoU), Acc NaN (no ground truth)
    predictions = np.array([0, 0, 2, 1])
    labels = np.array([0, 0, 0, 1])
    m = segmentation_metrics(confusion_matrix(predictions, labels, 3))
    np.testing.assert_allclose(m["IoU"], [2 / 3, 1.0, 0.0])
    assert m["mIoU"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert m["Acc"][0] == pytest.approx(2 / 3) and m["Acc"][1] == 1.0 and math.isnan(m["Acc"][2])
    assert m["mAcc"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["aAcc"] == pytest.approx(3 / 4)


def test_labels_outside_the_classes_are_ignored():
    predictions = np.array([0, 1, 1, 0])
    # the reference maps labels outside [0, K) to its ignore index
    labels = np.array([0, 255, -1, 1])
    counts = np.asarray(confusion_matrix(predictions, labels, 2, ignore_label=-100))
    np.testing.assert_array_equal(counts, [[1, 0], [1, 0]])


def test_accumulation_equals_one_pass_and_works_under_jit():
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 5, size=(6, 7, 9))
    labels = np.where(rng.uniform(size=(6, 7, 9)) < 0.1, -100, rng.integers(0, 5, size=(6, 7, 9)))
    matrix = ConfusionMatrix(5)
    jitted = jax.jit(confusion_matrix, static_argnums=(2, 3))
    for i in range(6):
        matrix.add(jitted(predictions[i], labels[i], 5, -100))
    whole = np.asarray(confusion_matrix(predictions, labels, 5))
    np.testing.assert_array_equal(matrix.counts, whole)
    valid = labels != -100
    assert whole.sum() == valid.sum()
    assert np.trace(whole) == (predictions == labels)[valid].sum()
    m = matrix.compute()
    assert m["aAcc"] == pytest.approx((predictions == labels)[valid].mean())


def test_table_and_json():
    m = segmentation_metrics(confusion_matrix(np.array([0, 1]), np.array([0, 1]), 3))
    table = format_table(m, ["bg", "a", "b"])
    assert "nan" in table.splitlines()[3] and "mIoU 100.00" in table
    clean = to_json(m)
    assert clean["IoU"] == [1.0, 1.0, None] and clean["mIoU"] == 1.0
