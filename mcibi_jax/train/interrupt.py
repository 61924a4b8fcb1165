"""Stopping training cleanly on Ctrl-C (SIGINT) or a preemption notice (SIGTERM).

    with StopRequests() as stop:            # in the main thread
        for step in ...:
            ...                             # a jitted step: never interrupted half-way
            if stop.reached(step):          # the same answer on every host
                save(); raise TrainingInterrupted(...)

A signal only sets a flag, so it never raises inside a step or an XLA compilation (which
could crash the process); training saves at the next step all hosts agree on. A second
signal exits at once, without saving. With several processes (``jax.distributed``), JAX's
preemption service agrees on the step: its notifier owns SIGTERM (a spot VM's or a cluster's
preemption notice on any host), and a Ctrl-C is passed on to it as SIGTERM. In one process,
both signals just set the flag.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` (None without checkpoints) at ``step``."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None, signal_name: str):
        super().__init__(f"interrupted ({signal_name}) at step {step} of {total_steps}")
        self.step, self.total_steps, self.checkpoint, self.signal_name = (
            step,
            total_steps,
            checkpoint,
            signal_name,
        )


def _jax_preemption_service() -> bool:

    return jax_distributed.global_state.preemption_sync_manager is not None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class StopRequests:
    """SIGINT / SIGTERM -> a stop request that :meth:`reached` reports at a step every host
    agrees on. Install it in the main thread (``with``); elsewhere it does nothing.

    ``abort(message, code)`` ends the process on a second signal (``code`` is 128 + the
    signal; e.g. :func:`mcibi_jax.distributed.fail_all`, which also stops the other hosts);
    the default is ``os._exit(code)``. ``check_every``: how often the hosts compare their
    requests when JAX's preemption service is off (every that many steps).
    """

    def __init__(self, abort: Callable[[str, int], None] | None = None, check_every: int = 1):
        self.signal_name: str | None = None
        self._abort = abort or (lambda message, code: os._exit(code))
        self._check_every = max(1, int(check_every))
        self._requested = threading.Event()
        self._count = 0
        self._installed = False
        self._multi = jax.process_count() > 1
        self._preemption = self._multi and _jax_preemption_service()

    @property
    def requested(self) -> bool:
        """Whether this process got a signal (other hosts may not have)."""
        return self._requested.is_set()

    def reached(self, step: int) -> bool:
        """True at the step where every process stops (call it after every step on every host)."""
        if self._preemption:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "SIGTERM"
                return True
            return False
        if self._multi:  # JAX's preemption service is off: agree every check_every steps
            if step % self._check_every:
                return False

            votes = multihost_utils.process_allgather(np.int32(self.requested))
            if np.any(votes):
                self.signal_name = self.signal_name or "a signal on another host"
                return True
            return False
        return self.requested

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        # SIGTERM stays with JAX's preemption notifier when it runs.
        self._signals = [signal.SIGINT] + ([] if self._preemption else [signal.SIGTERM])
        self._previous = {s: signal.signal(s, self._python_handler) for s in self._signals}
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._watcher = threading.Thread(
            target=self._watch, name="mcibi-stop-requests", daemon=True
        )
        self._watcher.start()
        self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._installed:
            return
        self._installed = False
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._writer.close()
        self._watcher.join(timeout=5)
        self._reader.close()

    @staticmethod
    def _python_handler(signum: int, frame: object) -> None:
        # the watcher thread acts on the byte the C handler wrote to the wakeup fd
        del (
            signum,
            frame,
        )

    def _watch(self) -> None:
        # The interpreter's C-level handler writes each signal's number here at once, even while
        # the main thread is inside a long XLA call (where Python-level handlers wait).
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self._count += 1
        if self._count > 1:
            _say(f"{name} again: exiting now without saving (the last complete checkpoint is kept)")
            sys.stdout.flush()
            self._abort(
                f"interrupted twice ({name}) on process {jax.process_index()}", 128 + signum
            )
            os._exit(128 + signum)
        self.signal_name = name
        self._requested.set()
        if jax.process_index() == 0:
            _say(
                f"{name}: saving a checkpoint after the current step, then stopping "
                f"({'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again exits at once, without saving)"
            )
        if self._preemption:
            # tell JAX's preemption service, which informs every host
            os.kill(os.getpid(), signal.SIGTERM)
