"""Items made ahead in a background thread (mcibi_jax.data.prefetch)."""

from __future__ import annotations

import threading
import time

import pytest

from mcibi_jax.data.prefetch import prefetch


class Counter:
    """``produce``: returns 0, 1, 2, ... and records the thread of every call."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0):
        self.calls, self.threads = 0, set()
        self.fail_at, self.delay = fail_at, delay

    def __call__(self) -> int:
        self.threads.add(threading.current_thread().name)
        if self.calls == self.fail_at:
            raise KeyError(f"sample {self.calls} is broken")
        time.sleep(self.delay)
        self.calls += 1
        return self.calls - 1


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mcibi-prefetch"]


def test_yields_every_result_in_order_from_another_thread():
    produce = Counter()
    assert list(prefetch(produce, 7, depth=3)) == list(range(7))
    assert produce.calls == 7
    assert produce.threads == {"mcibi-prefetch"}
    assert not _prefetch_threads()


def test_an_error_comes_after_the_results_made_before_it():
    items = prefetch(Counter(fail_at=2), 5)
    assert [next(items), next(items)] == [0, 1]
    with pytest.raises(KeyError, match="sample 2 is broken"):
        next(items)
    assert not _prefetch_threads()


def test_closing_early_stops_the_thread_within_depth_plus_one_calls():
    produce = Counter(delay=0.01)
    items = prefetch(produce, 1000, depth=2)
    assert [next(items), next(items)] == [0, 1]
    time.sleep(0.2)  # the thread fills its queue and waits
    items.close()
    assert not _prefetch_threads()
    assert produce.calls <= 2 + 2 + 1


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be at least 1"):
        list(prefetch(Counter(), 3, depth=0))


def test_data_benchmark_measures_the_loops_wait():
    from mcibi_jax import load_config
    from tests.helpers import load_script

    data_benchmark = load_script("benchmarks", "data")
    config = load_config(
        "configs/ade20k.py:r50",
        [
            "dataset.train.output_size=(32, 24)",
            "dataset.train.crop_size=(16, 16)",
            "dataset.train.pad_size=(16, 16)",
            "train.batch_size=2",
        ],
    )
    source = data_benchmark.SyntheticSource([(24, 32)], 150, count=8, decode=True)
    waits = data_benchmark.measure_loop_wait(config, source, 0.01, batches=2, warmup=1)
    assert set(waits) == {"made ahead", "made in the loop"}
    assert all(0 <= w < 5 for w in waits.values())
    assert not _prefetch_threads()
