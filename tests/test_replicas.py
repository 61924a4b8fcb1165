"""Data-parallel semantics of the reference (R GPUs, each with N / R images), on one device."""

from __future__ import annotations

import numpy as np
import pytest

from mcibi_jax.models.memory import update_memory, update_memory_per_replica
from mcibi_jax.train.losses import cross_entropy

RNG = np.random.default_rng(0)


def test_memory_is_updated_per_replica():
    memory = RNG.normal(size=(4, 1, 8)).astype(np.float32)
    memory[2] = 0.0  # a row initialised from the class mean on the replicas that see class 2
    features = RNG.normal(size=(4, 6, 5, 8)).astype(np.float32)
    labels = RNG.integers(-1, 4, size=(4, 6, 5)).astype(np.int32)
    labels[labels == -1] = -100
    labels[:2][labels[:2] == 3] = 0  # class 3 only on the second replica
    replicas = np.asarray(update_memory_per_replica(memory, features, labels, 2, momentum=0.3))
    for r in range(2):
        part = slice(2 * r, 2 * r + 2)
        np.testing.assert_allclose(
            replicas[r],
            update_memory(memory, features[part], labels[part], momentum=0.3),
            rtol=1e-6,
            atol=1e-6,
        )
    np.testing.assert_array_equal(replicas[0, 3], memory[3])


def test_replica_split_must_be_even():
    with pytest.raises(ValueError, match="cannot be split into 3"):
        update_memory_per_replica(
            np.zeros((2, 1, 4), np.float32),
            np.zeros((4, 2, 2, 4), np.float32),
            np.zeros((4, 2, 2), np.int32),
            3,
            momentum=0.1,
        )


def test_cross_entropy_is_the_mean_of_per_replica_means():
    logits = RNG.normal(size=(4, 3, 5, 6)).astype(np.float32)
    labels = RNG.integers(0, 6, size=(4, 3, 5))
    labels[0, :2] = -100  # replicas see different numbers of valid pixels
    per_replica = [float(cross_entropy(logits[i : i + 2], labels[i : i + 2])) for i in (0, 2)]
    np.testing.assert_allclose(
        float(cross_entropy(logits, labels, num_replicas=2)), np.mean(per_replica), rtol=1e-6
    )
    assert not np.isclose(float(cross_entropy(logits, labels)), np.mean(per_replica), rtol=1e-6)
