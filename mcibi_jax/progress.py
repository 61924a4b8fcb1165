"""The progress bar of long jobs: a ``rich.progress`` bar on interactive terminals only.

Where the output is not a terminal (a log file, CI, captured output) nothing is drawn: no
control characters, only the job's own log lines and, if asked for (``log_every``), a plain
progress line every so often.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

ENV_VAR = "MCIBI_PROGRESS"
# Rate and ETA average over this window: long enough to keep slow steps (a few minutes) in it.
RATE_WINDOW_S = 600.0


def format_duration(seconds: float) -> str:
    """Seconds as M:SS, or H:MM:SS from one hour on."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def format_value(value: Any) -> str:
    """A postfix value: integers as is, real numbers (incl. 0-d arrays) with 4 significant digits."""
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real) or getattr(value, "ndim", None) == 0:
        try:
            return f"{float(value):.4g}"
        except (TypeError, ValueError):
            pass
    return str(value)


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def resolve_enabled(stream: TextIO, enabled: bool | None = None) -> bool:
    """`enabled` if given; else MCIBI_PROGRESS=0/1 if set; else whether `stream` is a terminal."""
    if enabled is not None:
        return enabled
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting == "0":
        return False
    if setting == "1":
        return True
    return _is_tty(stream)


class _Rate(ProgressColumn):
    """Steps per second over the last :data:`RATE_WINDOW_S`."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("? it/s" if speed is None else f"{speed:.2f} it/s", style="progress.data.speed")


def _one_line() -> Column:
    return Column(no_wrap=True, overflow="ellipsis")


class ProgressBar:
    """A live bar over ``total`` steps (0: unknown) with rate, ETA and ``key=value`` postfixes.

    ``enabled``: None (auto) shows it on a terminal only (``MCIBI_PROGRESS=0/1`` overrides);
    False (e.g. not the main process) makes every method a no-op. ``log_every`` > 0: where the
    bar is auto-disabled, print a plain line on ``stream`` every that many seconds instead.
    ``min_interval``: seconds between redraws (the last step is always drawn). ``set_position``
    and ``restart_clock`` restart rate and ETA, so steps skipped by a resumed job or a slow
    first (compiling) step do not count.
    """

    def __init__(
        self,
        total: int,
        description: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        min_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        log_every: float = 0.0,
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total = int(total)
        self.description = description
        self.stream = sys.stderr if stream is None else stream
        self.enabled = resolve_enabled(self.stream, enabled)
        self.min_interval = min_interval
        self.clock = clock
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self._log_every = log_every if enabled is None and not self.enabled else 0.0
        self._start = self._last_line = clock()
        self._started_at = self.done
        self._last_draw = -math.inf
        self._live = self._closed = False
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}", table_column=_one_line()),
                BarColumn(bar_width=24),
                MofNCompleteColumn(table_column=_one_line()),
                TimeElapsedColumn(table_column=_one_line()),
                TimeRemainingColumn(table_column=_one_line()),
                _Rate(table_column=_one_line()),
                # the postfix takes the rest of the line, cut short on narrow terminals
                TextColumn(
                    "{task.fields[postfix]}",
                    markup=False,
                    table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
                ),
                console=Console(file=self.stream, force_terminal=True),
                auto_refresh=False,
                speed_estimate_period=RATE_WINDOW_S,
                expand=True,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
                get_time=clock,
            )
            self._task = self._progress.add_task(description, total=self.total or None, postfix="")

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by `n` steps, merges `postfix` into the shown k=v pairs, redraws if due."""
        if self._closed or not (self.enabled or self._log_every):
            return
        self.done += n
        self.postfix.update(postfix)
        now = self.clock()
        finished = self.total > 0 and self.done >= self.total
        if not self.enabled:
            self._log_line(now, finished)
            return
        self._progress.update(self._task, completed=self.done, postfix=self._postfix())
        if finished or now - self._last_draw >= self.min_interval:
            self._draw(now)

    def set_position(self, done: int) -> None:
        """Jumps to `done` steps (e.g. when resuming) and counts rate and ETA from here."""
        if self._closed or not (self.enabled or self._log_every):
            return
        self.done = int(done)
        self.restart_clock()
        if self.enabled:
            self._draw(self.clock())

    def restart_clock(self) -> None:
        """Counts rate and ETA from now on (e.g. after a compilation that is not representative)."""
        if self._closed:
            return
        self._start, self._started_at = self.clock(), self.done
        if self.enabled:
            self._progress.reset(
                self._task, total=self.total or None, completed=self.done, postfix=self._postfix()
            )

    def interleave(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` wrapped so that its lines appear above the bar (erased, then redrawn); ``log``
        itself when the bar is disabled. ``log`` may write to another stream (stdout)."""
        if not self.enabled:
            return log

        def log_above(message: str) -> None:
            if not self._live or self._closed:
                log(message)
                return
            self._progress.stop()  # transient: erases the bar
            try:
                log(message)
            finally:
                self._progress.start()

        return log_above

    def close(self) -> None:
        """Leaves the final state of the bar on screen (if it was drawn); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._live:
            self._progress.live.transient = False  # stop() then draws the last state and keeps it
            self._progress.stop()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _postfix(self) -> str:
        return " ".join(f"{k}={format_value(v)}" for k, v in self.postfix.items())

    def _draw(self, now: float) -> None:
        if self._live:
            self._progress.refresh()
        else:
            self._progress.start()
            self._live = True
        self._last_draw = now

    def _log_line(self, now: float, finished: bool) -> None:
        """The plain line of a stream that is not a terminal, every ``log_every`` seconds (and at
        the end, unless the whole job took less than that)."""
        if now - self._last_line < self._log_every and not finished:
            return
        if finished and now - self._start < self._log_every:
            return
        self._last_line = now
        rate = (self.done - self._started_at) / max(now - self._start, 1e-9)
        counts = (
            f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"
            if self.total
            else f"{self.done}"
        )
        left = (self.total - self.done) / rate if self.total and rate > 0 else math.inf
        eta = f", about {format_duration(left)} left" if math.isfinite(left) else ""
        print(f"{self.description} {counts}, {rate:.1f} it/s{eta}", file=self.stream, flush=True)
