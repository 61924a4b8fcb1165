"""What an experiment reads from its dataset, whatever the dataset.

    data = experiment_data(config)           # chosen once, from config.dataset.name
    training = data.training(mesh)           # global batches of each epoch, resumable
    evaluation = data.evaluation()           # this host's held-out images, their count, class names
    items, num_images = data.submission()    # dataset.eval_set without labels, for a test server

Two implementations: :class:`mcibi_jax.data.synthetic.SyntheticData` (the generated scenes of
configs/demo.py, nothing on disk) and :class:`mcibi_jax.data.pipeline.GrainData` (the datasets
of mcibi_jax.data.datasets, read and augmented by the Grain pipeline). Nothing else looks at
the dataset's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from mcibi_jax.config import ConfigError

# {"images": float32 (B, H, W, 3), "labels": int32 (B, H, W)}: a global batch split over the
# mesh's 'data' axis (every host holds its part).
Batch = dict[str, jax.Array]


class DatasetUnavailable(RuntimeError):
    """The config names a dataset that cannot be read."""


class TrainingData(Protocol):
    """The training batches of a run.

    ``epoch(e, skip)`` yields the ``steps_per_epoch`` global batches of epoch ``e`` (from 1)
    after the first ``skip`` (trained before a resume); ``state()`` is this host's input
    position (JSON-able, saved with each checkpoint) and ``restore(state)`` goes back to it.
    """

    num_images: int
    steps_per_epoch: int
    image_size: tuple[int, int]  # (H, W) of a training image, for the model's initialisation

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]: ...

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


class EvaluationData(NamedTuple):
    """The held-out set: this host's share, scored by every host together."""

    batches: Iterable[Mapping[str, np.ndarray]]  # {"images": (N, H, W, 3), "labels": (N, H, W)}
    num_images: int  # of all hosts
    class_names: list[str]


class ExperimentData(Protocol):
    """A dataset as :mod:`mcibi_jax.train.experiment` reads it."""

    def training(self, mesh: Mesh) -> TrainingData: ...

    def evaluation(self) -> EvaluationData: ...

    def submission(self) -> tuple[Iterable[dict[str, Any]], int]:
        """(evaluation-loader items with "id", number of images) of ``dataset.eval_set``,
        read without labels."""
        ...


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches of ``batch_size`` in an epoch of ``num_images`` (the rest is dropped)."""
    steps = num_images // batch_size
    if steps < 1:
        raise ConfigError(f"{num_images} training images do not make one batch of {batch_size}")
    return steps


def experiment_data(config: Mapping[str, Any]) -> ExperimentData:
    """The data of ``config.dataset``: the generated ``synthetic`` scenes, or a dataset on disk."""
    # Imported here: both implementations import this module (their Batch and protocols).
    from mcibi_jax.data import synthetic

    if config["dataset"]["name"] == synthetic.NAME:
        return synthetic.SyntheticData(config)
    from mcibi_jax.data.pipeline import GrainData

    return GrainData(config)
