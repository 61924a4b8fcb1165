"""Items made ahead in a background thread, so the training loop's thread only dispatches steps.

A global batch costs the host real time after its samples are ready: stacking them (a
Cityscapes host batch of 16 crops is 134 MB) and handing them to the devices. Made in the
loop's thread, that time adds to every step once the devices are fast; made in a thread of its
own, it overlaps the step the devices are running.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

DEPTH = 2  # items made ahead: one for the next step, one more to absorb a slow sample


def prefetch(produce: Callable[[], T], count: int, depth: int = DEPTH) -> Iterator[T]:
    """Yields the results of ``count`` calls of ``produce``, made by a thread up to ``depth``
    results ahead of the consumer.

    An exception raised by ``produce`` is raised here, in place of the result it did not make
    (the earlier results come first). Closing the generator, or leaving it by an exception,
    stops the thread once its current call returns: at most ``depth + 1`` calls are made beyond
    the results taken.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        for _ in range(count):
            if stop.is_set():
                return
            try:
                entry = (True, produce())
            except BaseException as error:  # handed to the consumer, which raises it
                hand_over((False, error))
                return
            if not hand_over(entry):
                return

    thread = threading.Thread(target=work, name="mcibi-prefetch", daemon=True)
    thread.start()
    try:
        for _ in range(count):
            made, value = results.get()
            if not made:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


__all__ = ["DEPTH", "prefetch"]
