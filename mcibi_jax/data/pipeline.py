"""Grain input pipelines: training batches and evaluation samples of a dataset on disk, and
:class:`GrainData`, which hands them to an experiment (as global batches for training).

Training (:func:`train_loader`) reads an endless stream. A grain ``IndexSampler`` shuffles the
whole set again each epoch (deterministically from the seed) and gives each record a random
generator of its own; host ``h`` of ``n`` reads the stream positions ``h, h + n, h + 2n, ...``
(what grain's ``DataLoader`` does with ``ShardByJaxProcess``; the stream is endless, so there
is no remainder to drop). Each position becomes a sample augmented by the random training
transform, drawing only from that record's generator, so a batch depends on the seed, the
host and its position in the stream, and not on how many processes or threads prepare it.

Worker processes (grain's ``mp_prefetch``) each compute every ``num_workers``-th position and
the main process takes them back in order, so it sees the same stream whatever the worker
count; inside each process ``num_threads`` threads compute positions ahead, also returned in
order. Skipping corrupt samples and stacking batches happen in the main process, after the
workers: the state of an iterator is just the next stream position (plus a count), and
restoring it rebuilds the stream from that position, with any worker or thread count.

Choosing workers and threads: an augmented 512x512 sample is 4 MB (float32 image, int32
label), and worker processes hand every byte over through shared memory, so they pay off only
with cores to spare; OpenCV and numpy release the GIL, so threads in one process already scale
over a few cores (``benchmarks/data.py`` measures both).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import cv2
import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from mcibi_jax.config import ConfigError
from mcibi_jax.data.datasets import CorruptSample, DatasetError, build_source
from mcibi_jax.data.experiment_data import (
    Batch,
    DatasetUnavailable,
    EvaluationData,
    steps_per_epoch,
)
from mcibi_jax.data.prefetch import prefetch
from mcibi_jax.data.transforms import (
    eval_transform,
    test_shape,
    train_transform,
)
from mcibi_jax.sharding import global_batch

log = logging.getLogger(__name__)

_STREAM_END = 2**62  # "endless": far more positions than any run reads
_STATE_VERSION = 1
NUM_WORKERS = 0  # default worker processes
# default threads per process: one per core, 4 to 16 (with 4, a 16-core H200 host's Grain
# batches slowed the Cityscapes R-50 bfloat16 train step by 9 %)
NUM_THREADS = min(16, max(4, os.cpu_count() or 4))

_skipped_lock = threading.Lock()
_skipped_total = 0
_skipped_by_path: collections.Counter[str] = collections.Counter()


def skipped_count() -> int:
    """How many samples the loaders of this process have skipped (corrupt or unusable) so far."""
    return _skipped_total


def skipped_files() -> dict[str, int]:
    """File -> how many times a loader of this process skipped a sample because of it."""
    with _skipped_lock:
        return dict(_skipped_by_path)


@dataclasses.dataclass(frozen=True)
class _Skipped:
    """Stands in the stream for a sample that could not be used (sent back by the workers)."""

    index: int  # record index in the source
    path: str
    reason: str
    sample_id: str | None = None


def _record_skip(skipped: _Skipped, what: str) -> None:
    global _skipped_total
    with _skipped_lock:
        _skipped_total += 1
        _skipped_by_path[skipped.path] += 1
        total = _skipped_total
    sample = f" (sample {skipped.sample_id!r})" if skipped.sample_id is not None else ""
    log.warning(
        "%s: skipping record %d%s, %s: %s [%d skipped in this process]",
        what,
        skipped.index,
        sample,
        skipped.path,
        skipped.reason,
        total,
    )


# --------------------------------------------------------------------------------------------
# Config helpers


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _plain(config: Any) -> dict[str, Any]:
    """A picklable plain dict of a ConfigDict / mapping (for the worker processes)."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (int, np.integer)):
        return int(x), int(x)
    a, b = x
    return int(a), int(b)


def _shard(shard_options: grain.sharding.ShardOptions | None) -> tuple[int, int]:
    options = (
        shard_options
        if shard_options is not None
        else grain.sharding.ShardByJaxProcess(drop_remainder=True)
    )
    if not 0 <= options.shard_index < options.shard_count:
        raise ValueError(f"shard_index {options.shard_index} is not in [0, {options.shard_count})")
    return int(options.shard_index), int(options.shard_count)


def _count(config: Any, name: str, value: int | None, default: int) -> int:
    if value is None:
        value = _get(_get(config, "train"), name)
    if value is None:
        value = default
    if int(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _read_options(num_threads: int) -> grain.ReadOptions:
    # threads compute whole samples ahead, in order (OpenCV and numpy release the GIL)
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)


def host_batch_size(global_batch_size: int, num_hosts: int) -> int:
    """The batch each host loads: ``global_batch_size / num_hosts``, which must be whole."""
    if global_batch_size <= 0:
        raise ValueError(f"the batch size must be positive, got {global_batch_size}")
    if global_batch_size % num_hosts:
        raise ValueError(
            f"config.train.batch_size={global_batch_size} (the global batch) is not divisible by the "
            f"{num_hosts} hosts (jax.process_count() / shard_count): each host loads an equal part of "
            f"every batch; use a global batch that is a multiple of {num_hosts}"
        )
    return global_batch_size // num_hosts


# --------------------------------------------------------------------------------------------
# Training


class _Augment(grain.transforms.RandomMap):
    """The recipe's random training transform (``train_transform``) as a grain RandomMap."""

    def __init__(self, dataset_config: Mapping[str, Any]):
        self._config = dict(dataset_config)
        self._fn = None

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if self._fn is None:
            # default rng never used
            self._fn = train_transform(self._config, np.random.default_rng(0))
        return self._fn(element, rng=rng)

    def __getstate__(self) -> dict[str, Any]:
        return {"_config": self._config, "_fn": None}


class _TrainElement:
    """Host stream position -> augmented ``{"image", "label"}``, or :class:`_Skipped`."""

    def __init__(
        self,
        source: Any,
        sampler: grain.samplers.IndexSampler,
        shard_index: int,
        shard_count: int,
        augment: _Augment,
        shape: tuple[int, int],
    ):
        self.source, self.sampler, self.augment, self.shape = source, sampler, augment, shape
        self.shard_index, self.shard_count = shard_index, shard_count

    def __call__(self, position: int) -> dict[str, np.ndarray] | _Skipped:
        meta = self.sampler[position * self.shard_count + self.shard_index]
        try:
            sample = self.source[meta.record_key]
        except CorruptSample as error:
            return _Skipped(int(meta.record_key), error.path, error.reason, error.sample_id)
        out = self.augment.random_map(sample, meta.rng)
        image, label = out["image"], out["label"]
        if image.shape[:2] != self.shape:
            # only with a non-square pad size and an image smaller than the crop in the other
            # orientation, which the transform then pads transposed (as the reference does)
            return _Skipped(
                int(meta.record_key),
                _image_file(self.source, meta.record_key, sample),
                f"augmented to {image.shape[0]}x{image.shape[1]}, not the batch's "
                f"{self.shape[0]}x{self.shape[1]}",
                sample.get("id"),
            )
        return {
            "image": np.ascontiguousarray(image, np.float32),
            "label": np.ascontiguousarray(label, np.int32),
        }


def _absl_flags_ready() -> None:
    # grain 0.2.18's multiprocessing reads an absl flag directly, which fails unless flags were
    # parsed (as absl.app.run does); outside such a program, use every flag's default
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _image_file(source: Any, index: int, sample: Mapping[str, Any]) -> str:
    samples = getattr(source, "samples", None)  # a dataset Source knows its files
    if samples is not None and hasattr(samples[index], "image"):
        return str(samples[index].image)
    return f"{source!r}[{index}] (id {sample.get('id')!r})"


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads only contend


class TrainLoader:
    """Endless per-host training batches; ``iter(loader)`` starts at the beginning of the stream.

    Attributes: ``batch_size`` (per host), ``global_batch_size``, ``shard_index``,
    ``shard_count``, ``seed``, ``num_workers``, ``num_threads``, ``source``, ``shape`` ((h, w)
    of a batch).
    """

    def __init__(
        self,
        source: Any,
        dataset_config: Mapping[str, Any],
        *,
        global_batch_size: int,
        seed: int,
        shard_index: int,
        shard_count: int,
        num_workers: int = 0,
        num_threads: int = 0,
    ):
        if len(source) == 0:
            raise ValueError(f"the training source {source!r} has no samples")
        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.batch_size = host_batch_size(self.global_batch_size, shard_count)
        self.seed, self.shard_index, self.shard_count = int(seed), shard_index, shard_count
        self.num_workers, self.num_threads = num_workers, num_threads
        train = dataset_config["train"]
        self.shape = _pair(train["pad_size"])
        self.sampler = grain.samplers.IndexSampler(
            num_records=len(source),
            shard_options=grain.sharding.NoSharding(),
            shuffle=True,
            num_epochs=None,
            seed=self.seed,
        )
        self._element = _TrainElement(
            source, self.sampler, shard_index, shard_count, _Augment(dataset_config), self.shape
        )

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self)

    def _stream(self, start: int) -> Iterator[Any]:
        ds = grain.MapDataset.range(start, _STREAM_END).map(self._element)
        ds = ds.to_iter_dataset(_read_options(self.num_threads))
        if self.num_workers > 0:
            _absl_flags_ready()
            buffer = max(2, math.ceil(self.batch_size / self.num_workers))
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.num_workers, per_worker_buffer_size=buffer
                ),
                worker_init_fn=_worker_init,
            )
        return iter(ds)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
            "batch_size": self.batch_size,
            "num_records": len(self.source),
            "shape": list(self.shape),
        }

    def __repr__(self) -> str:
        return (
            f"TrainLoader({self.source!r}, batch {self.batch_size} per host of {self.global_batch_size}, "
            f"host {self.shard_index}/{self.shard_count}, seed {self.seed}, {self.num_workers} workers, "
            f"{self.num_threads} threads)"
        )


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Batches ``{"image": float32 (B, H, W, 3), "label": int32 (B, H, W)}`` of one host.

    ``get_state()`` / ``set_state()`` save and restore the position (a small JSON-able dict);
    ``skipped`` counts the samples this stream has skipped (kept in the state). Call
    ``close()`` (or use ``with``) to stop the worker processes early.
    """

    def __init__(self, loader: TrainLoader, position: int = 0, skipped: int = 0):
        self.loader = loader
        self._position = int(position)  # next stream position to read
        self.skipped = int(skipped)
        self._stream: Iterator[Any] | None = None  # started on the first batch

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stream is None:
            self._stream = self.loader._stream(self._position)
        size = self.loader.batch_size
        images, labels = [], []
        position, skipped, in_a_row = self._position, self.skipped, 0
        while len(images) < size:
            element = next(self._stream)
            position += 1
            if isinstance(element, _Skipped):
                _record_skip(element, "training data")
                skipped += 1
                in_a_row += 1
                if in_a_row > len(self.loader.source):
                    raise RuntimeError(
                        f"{in_a_row} samples in a row could not be used; "
                        f"the last: {element.path}: {element.reason}"
                    )
                continue
            in_a_row = 0
            images.append(element["image"])
            labels.append(element["label"])
        self._position, self.skipped = position, skipped
        return {"image": np.stack(images), "label": np.stack(labels)}

    def get_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "position": self._position,
            "skipped": self.skipped,
            **self.loader._fingerprint(),
        }

    def set_state(self, state: Mapping[str, Any] | bytes | str) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown data iterator state version {state.get('version')!r}")
        expected = self.loader._fingerprint()
        saved = {k: state.get(k) for k in expected}
        if saved != expected:
            diff = ", ".join(
                f"{k}: saved {saved[k]!r}, now {v!r}" for k, v in expected.items() if saved[k] != v
            )
            raise ValueError(f"the data iterator state was saved for another pipeline ({diff})")
        self.close()
        self._position, self.skipped = int(state["position"]), int(state["skipped"])

    def close(self) -> None:
        if self._stream is not None and hasattr(self._stream, "close"):
            self._stream.close()
        self._stream = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def train_loader(
    config: Any,
    *,
    source: Any = None,
    seed: int | None = None,
    num_workers: int | None = None,
    num_threads: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> TrainLoader:
    """Endless, shuffled, augmented training batches of this host.

    Args:
      config: the experiment config: ``dataset`` (name, root, train_set, train, mean, std,
        ignore_label) and ``train.batch_size`` (global), ``train.seed``, optionally
        ``train.num_workers`` and ``train.num_threads``.
      source: a random-access source of ``{"image": uint8 (H, W, 3), "label": int32 (H, W)}``
        samples (``len`` and ``[i]``; ``CorruptSample`` for unusable ones); default
        ``build_source(config.dataset, config.dataset.train_set)``.
      seed: shuffling and augmentation seed (0 <= seed < 2**32); default ``config.train.seed``.
      num_workers: worker processes (0: all in this process); default ``config.train.num_workers``
        or NUM_WORKERS.
      num_threads: threads preparing samples ahead in each process that prepares them (0: one
        at a time); default ``config.train.num_threads`` or NUM_THREADS. The batches depend on
        neither.
      shard_options: which host this is, of how many; default
        ``grain.sharding.ShardByJaxProcess(drop_remainder=True)`` (``jax.process_index()`` of
        ``jax.process_count()``). Each host loads ``config.train.batch_size / shard_count``.

    Returns:
      A :class:`TrainLoader`; ``iter(loader)`` gives a :class:`TrainIterator` of
      ``{"image": float32 (B, H, W, 3), "label": int32 (B, H, W)}`` with (H, W) the pad size.
      Samples that raise ``CorruptSample`` are skipped (logged as warnings naming the file,
      counted in ``iterator.skipped`` and :func:`skipped_count`); the batch is filled from the
      next positions of the stream, so the stream stays deterministic.

    Raises:
      ValueError: the global batch is not divisible by the number of hosts.
    """
    shard_index, shard_count = _shard(shard_options)
    train = _get(config, "train")
    if seed is None:
        seed = _get(train, "seed", _get(config, "seed", 0))
    if source is None:
        source = build_source(config.dataset, config.dataset.train_set)
    return TrainLoader(
        source,
        _plain(config.dataset),
        global_batch_size=int(_get(train, "batch_size")),
        seed=int(seed),
        shard_index=shard_index,
        shard_count=shard_count,
        num_workers=_count(config, "num_workers", num_workers, NUM_WORKERS),
        num_threads=_count(config, "num_threads", num_threads, NUM_THREADS),
    )


def iterator_state(iterator: TrainIterator) -> dict[str, Any]:
    """The state of a training iterator, a small JSON-serialisable dict (save it with a checkpoint)."""
    return iterator.get_state()


def restore_iterator(loader: TrainLoader, state: Mapping[str, Any] | bytes | str) -> TrainIterator:
    """A new iterator of ``loader`` that yields exactly the batches the saved iterator would have.

    ``state`` comes from :func:`iterator_state` (or its JSON). The loader must have the same
    source size, seed, hosts and batch size (checked); its worker and thread counts may differ.
    """
    iterator = TrainIterator(loader)
    iterator.set_state(state)
    return iterator


# --------------------------------------------------------------------------------------------
# Evaluation


class _EvalElement:
    """Host position -> evaluation item (without the placeholder for unusable samples)."""

    def __init__(
        self, source: Any, dataset_config: Mapping[str, Any], shard_index: int, shard_count: int
    ):
        self.source, self.config = source, dict(dataset_config)
        self.shard_index, self.shard_count = shard_index, shard_count
        self._fn = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fn": None}

    def __call__(self, position: int) -> dict[str, Any] | _Skipped:
        if self._fn is None:
            self._fn = eval_transform(self.config)
        index = position * self.shard_count + self.shard_index
        valid = index < len(self.source)
        index %= len(self.source)  # hosts with fewer samples repeat one, marked invalid
        try:
            sample = self.source[index]
        except CorruptSample as error:
            return _Skipped(index, error.path, error.reason, error.sample_id)
        out = self._fn({"image": sample["image"], "label": sample["label"]})
        return {
            "image": out["image"][None],
            "label": out["label"][None],
            "valid": np.array([valid]),
            "id": str(sample.get("id", index)),
            "index": index,
        }


class EvalLoader:
    """One pass over this host's share of an evaluation set, one sample at a time.

    ``len(loader)`` items per host (the same on every host); see :func:`eval_loader`.
    """

    def __init__(
        self,
        source: Any,
        dataset_config: Mapping[str, Any],
        *,
        shard_index: int,
        shard_count: int,
        num_workers: int = 0,
        num_threads: int = 0,
    ):
        if len(source) == 0:
            raise ValueError(f"the evaluation source {source!r} has no samples")
        self.source, self.shard_index, self.shard_count = source, shard_index, shard_count
        self.num_workers, self.num_threads = num_workers, num_threads
        self._element = _EvalElement(source, dataset_config, shard_index, shard_count)
        ignore = int(dataset_config["ignore_label"])
        side = min(_pair(dataset_config["test"]["output_size"]))
        h, w = test_shape(dataset_config, (side, side))
        self._placeholder = (h, w, ignore)

    def __len__(self) -> int:
        return -(-len(self.source) // self.shard_count)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = (
            grain.MapDataset.range(len(self))
            .map(self._element)
            .to_iter_dataset(_read_options(self.num_threads))
        )
        if self.num_workers > 0:
            _absl_flags_ready()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.num_workers, per_worker_buffer_size=2
                ),
                worker_init_fn=_worker_init,
            )
        stream = iter(ds)
        try:
            for item in stream:
                if isinstance(item, _Skipped):
                    _record_skip(item, "evaluation data")
                    h, w, ignore = self._placeholder
                    item = {
                        "image": np.zeros((1, h, w, 3), np.float32),
                        "label": np.full((1, h, w), ignore, np.int32),
                        "valid": np.array([False]),
                        "id": str(item.sample_id or item.index),
                        "index": item.index,
                    }
                yield item
        finally:
            if hasattr(stream, "close"):
                stream.close()

    def __repr__(self) -> str:
        return (
            f"EvalLoader({self.source!r}, {len(self)} items on host {self.shard_index}/{self.shard_count}, "
            f"{self.num_workers} workers, {self.num_threads} threads)"
        )


def eval_loader(
    config: Any,
    *,
    source: Any = None,
    num_workers: int | None = None,
    num_threads: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> EvalLoader:
    """One pass over this host's share of ``config.dataset.eval_set``, in order, one sample per item.

    Evaluation runs whole images of different sizes, so items are single samples (batch 1) of
    variable size rather than padded batches. Host ``h`` of ``n`` gets the records ``h, h + n,
    ...``; every host yields ``ceil(len(source) / n)`` items, the hosts with fewer records ending
    with a repeated one marked invalid, so that all hosts run the same number of steps.

    Each item: ``"image"`` float32 (1, H', W', 3) (resized for ``dataset.test`` and
    normalised), ``"label"`` int32 (1, H, W) at the original resolution (predictions are
    resized back to it), ``"valid"`` bool (1,) (False: do not score it), ``"id"`` str and
    ``"index"`` int (record index in the source). A sample that raises ``CorruptSample`` is
    logged and counted (:func:`skipped_count`) and comes as an invalid placeholder (zeros,
    all-ignore label, at the size a square image is resized to). ``num_workers`` and
    ``num_threads`` as for :func:`train_loader`.
    """
    shard_index, shard_count = _shard(shard_options)
    if source is None:
        source = build_source(config.dataset, config.dataset.eval_set)
    return EvalLoader(
        source,
        _plain(config.dataset),
        shard_index=shard_index,
        shard_count=shard_count,
        num_workers=_count(config, "num_workers", num_workers, NUM_WORKERS),
        num_threads=_count(config, "num_threads", num_threads, NUM_THREADS),
    )


# --------------------------------------------------------------------------------------------
# A dataset on disk as an experiment reads it


class GrainData:
    """``config.dataset`` (a dataset of :mod:`mcibi_jax.data.datasets` under ``dataset.root``)
    through the loaders above; see :class:`mcibi_jax.data.experiment_data.ExperimentData`."""

    def __init__(self, config: Any):
        self._config = config

    def _source(self, split: str, with_labels: bool = True) -> Any:
        try:
            return build_source(self._config["dataset"], split, with_labels=with_labels)
        except DatasetError as error:
            raise DatasetUnavailable(
                f"{error}\n(see docs/datasets.md for the expected layout; set "
                "--config.dataset.root=...)"
            ) from None

    def training(self, mesh: Mesh) -> GrainTraining:
        return GrainTraining(self._config, self._source(self._config["dataset"]["train_set"]), mesh)

    def evaluation(self) -> EvaluationData:
        source = self._source(self._config["dataset"]["eval_set"])
        # Each image at its own size; padding items of a host (valid=False) are not scored.
        batches = (
            {"images": item["image"], "labels": item["label"]}
            for item in eval_loader(self._config, source=source)
            if item["valid"].all()
        )
        return EvaluationData(batches, len(source), list(source.class_names))

    def submission(self) -> tuple[EvalLoader, int]:
        source = self._source(self._config["dataset"]["eval_set"], with_labels=False)
        return eval_loader(self._config, source=source), len(source)


class GrainTraining:
    """The endless stream of :func:`train_loader` cut into epochs of global batches; its state is
    this host's stream position (``data/process_<i>-of-<n>.json`` in a training checkpoint).

    A background thread builds the next global batches (stacked and placed on the devices)
    while the loop's thread runs the step (:func:`mcibi_jax.data.prefetch.prefetch`); ``state()``
    is the position after the last batch the loop took, not after those made ahead."""

    def __init__(self, config: Any, source: Any, mesh: Mesh):
        self._loader = train_loader(config, source=source)
        self._iterator = iter(self._loader)
        self._state = iterator_state(self._iterator)  # after the last batch handed out
        self._mesh = mesh
        self.num_images = len(source)
        self.image_size = _pair(config["dataset"]["train"]["crop_size"])
        self.steps_per_epoch = steps_per_epoch(self.num_images, int(config["train"]["batch_size"]))

    @property
    def loader(self) -> TrainLoader:
        return self._loader

    def _next_batch(self) -> tuple[Batch, dict[str, Any]]:
        batch = next(self._iterator)
        placed = global_batch({"images": batch["image"], "labels": batch["label"]}, self._mesh)
        return placed, iterator_state(self._iterator)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        del epoch  # the stream goes on from epoch to epoch
        # a restored iterator is already past the skipped batches
        count, taken = self.steps_per_epoch - skip, 0
        try:
            with contextlib.closing(prefetch(self._next_batch, count)) as batches:
                for batch, self._state in batches:
                    taken += 1
                    yield batch
        finally:
            if taken < count:  # left early: the thread read past the batches taken
                self._reopen(self._state)

    def state(self) -> dict[str, Any]:
        return self._state

    def _reopen(self, state: Mapping[str, Any]) -> None:
        reopened = restore_iterator(self._loader, state)  # checks the state first
        self._iterator.close()
        self._iterator, self._state = reopened, iterator_state(reopened)

    def restore(self, state: Any) -> None:
        if not state:
            return
        try:
            self._reopen(state)
        except ValueError as error:
            raise ConfigError(
                f"cannot resume the input pipeline of process {jax.process_index()}: {error}. "
                "Resume with the dataset, batch size and processes of the checkpoint, or use a new "
                "--workdir."
            ) from None


__all__ = [
    "EvalLoader",
    "GrainData",
    "GrainTraining",
    "TrainIterator",
    "TrainLoader",
    "eval_loader",
    "host_batch_size",
    "iterator_state",
    "restore_iterator",
    "skipped_count",
    "skipped_files",
    "train_loader",
]
