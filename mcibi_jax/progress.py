"""A dependency-free, single-line progress bar for long jobs on interactive terminals."""

from __future__ import annotations

import math
import numbers
import os
import shutil
import sys
import time
from typing import Any, Callable, TextIO

BAR_WIDTH = 24
ENV_VAR = "MCIBI_PROGRESS"


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


class ProgressBar:
    """Redraws one terminal line with the progress of `total` steps.

    Disabled (e.g. no terminal, or not the main process), every method is a no-op.
    Rate and ETA count only the steps passed to `update` since construction, so a
    resumed job (`set_position`) reports its true speed.
    """

    def __init__(
        self,
        total: int,
        description: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        min_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
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
        self._steps = 0
        self._start = clock() if self.enabled else 0.0
        self._last_draw = -math.inf
        self._shown = 0
        self._drawn = False
        self._closed = False

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by `n` steps, merges `postfix` into the shown k=v pairs, redraws if due."""
        if not self.enabled or self._closed:
            return
        self.done += n
        self._steps += n
        self.postfix.update(postfix)
        now = self.clock()
        finished = self.total > 0 and self.done >= self.total
        if finished or now - self._last_draw >= self.min_interval:
            self._draw(now)

    def set_position(self, done: int) -> None:
        """Jumps to `done` steps (e.g. when resuming) without counting them towards the rate."""
        if not self.enabled or self._closed:
            return
        self.done = int(done)
        self._draw(self.clock())

    def restart_clock(self) -> None:
        """Counts rate and ETA from now on (e.g. after a compilation that is not representative)."""
        if self.enabled:
            self._start, self._steps = self.clock(), 0

    def clear(self) -> None:
        """Erases the bar line if it is on screen."""
        if not self.enabled or not self._shown:
            return
        self.stream.write("\r" + " " * self._shown + "\r")
        self.stream.flush()
        self._shown = 0

    def write(self, message: str) -> None:
        """Prints `message` on its own line above the bar, then redraws the bar."""
        if not self.enabled or self._closed:
            return
        self.clear()
        self.stream.write(message + "\n")
        self._draw(self.clock())

    def interleave(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` wrapped so that its lines appear above the bar (erased, then redrawn); ``log``
        itself when the bar is disabled."""
        if not self.enabled:
            return log

        def log_above(message: str) -> None:
            if self._closed:
                log(message)
                return
            self.clear()
            log(message)
            if self._drawn:
                self._draw(self.clock())

        return log_above

    def close(self) -> None:
        """Draws the final state and ends the line, if anything was drawn."""
        if not self.enabled or self._closed:
            return
        if self._drawn:
            self._draw(self.clock())
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def render(self, now: float | None = None) -> str:
        """The bar line (without carriage return or padding), fitted to the terminal width."""
        now = self.clock() if now is None else now
        elapsed = max(now - self._start, 0.0)
        rate = self._steps / elapsed if elapsed > 0 else 0.0
        head = f"{self.description} " if self.description else ""
        if self.total > 0:
            filled = min(BAR_WIDTH, BAR_WIDTH * max(self.done, 0) // self.total)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            remaining = max(self.total - self.done, 0)
            eta = format_duration(remaining / rate) if rate > 0 else "?"
            core = (f"{head}|{bar}| {self.done}/{self.total} "
                    f"[{format_duration(elapsed)}<{eta}, {rate:.2f} it/s]")
        else:
            core = f"{head}{self.done} [{format_duration(elapsed)}, {rate:.2f} it/s]"
        tail = "".join(f" {k}={format_value(v)}" for k, v in self.postfix.items())
        width = max(shutil.get_terminal_size((80, 24)).columns - 1, 1)
        return (core + tail)[:width]

    def _draw(self, now: float) -> None:
        line = self.render(now)
        self.stream.write("\r" + line + " " * max(self._shown - len(line), 0))
        self.stream.flush()
        self._shown = len(line)
        self._last_draw = now
        self._drawn = True
