"""The progress bar: a live rich bar on terminals only, log lines above it, clean plain output."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from mcibi_jax.progress import ProgressBar, format_duration, format_value


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _terminal(monkeypatch):
    monkeypatch.delenv("MCIBI_PROGRESS", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERM", "xterm-256color")


def make_bar(total: int = 10, **kwargs) -> tuple[ProgressBar, FakeTTY, FakeClock]:
    stream, clock = FakeTTY(), FakeClock()
    kwargs.setdefault("description", "train")
    return ProgressBar(total, stream=stream, clock=clock, **kwargs), stream, clock


_ESCAPE = re.compile(r"\x1b\[(\??)([0-9;]*)([A-Za-z])")


def screen(text: str) -> list[str]:
    """What a terminal shows after printing `text`: \\r, \\n, cursor up, erase line; colours
    and cursor visibility are dropped."""
    lines, row, col, i = [""], 0, 0, 0
    while i < len(text):
        escape = _ESCAPE.match(text, i)
        if escape:
            private, number, command = escape.groups()
            if not private and command == "A":
                row = max(row - int(number or 1), 0)
            elif not private and command == "K":
                lines[row] = ""
            i = escape.end()
            continue
        ch = text[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1 :]
            col += 1
        i += 1
    return [line.rstrip(" ") for line in lines]


def shown(stream: io.StringIO) -> str:
    """The bar line on screen (the last non-empty one)."""
    return [line for line in screen(stream.getvalue()) if line][-1]


def draws(stream: io.StringIO) -> int:
    return _ESCAPE.sub("", stream.getvalue()).count("train ")


def test_disabled_on_a_plain_stream_writes_nothing():
    stream = io.StringIO()
    bar = ProgressBar(5, stream=stream)
    assert not bar.enabled
    log = print
    assert bar.interleave(log) is log
    with bar:
        bar.update(3, loss=1.0)
        bar.set_position(4)
        bar.restart_clock()
    assert stream.getvalue() == ""


def test_disabled_explicitly_writes_nothing_even_on_a_terminal():
    bar, stream, clock = make_bar(enabled=False, log_every=1.0)
    with bar:
        for _ in range(10):
            clock.now += 2.0
            bar.update()
    assert stream.getvalue() == ""


def test_enabled_on_a_terminal():
    bar, stream, _ = make_bar()
    assert bar.enabled
    assert stream.getvalue() == ""  # nothing before the first step
    bar.update()
    assert shown(stream).startswith("train ") and " 1/10 " in shown(stream)


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("MCIBI_PROGRESS", "0")
    assert not ProgressBar(3, stream=FakeTTY()).enabled
    monkeypatch.setenv("MCIBI_PROGRESS", "1")
    assert ProgressBar(3, stream=io.StringIO()).enabled
    assert not ProgressBar(3, stream=io.StringIO(), enabled=False).enabled


def test_rate_eta_and_postfix():
    bar, stream, clock = make_bar(total=100)
    for _ in range(20):
        clock.now += 0.5
        bar.update(1, loss=0.123456, lr=np.float32(0.01), epoch=3, mode="poly")
    line = shown(stream)
    assert " 20/100 0:00:10 0:00:40 2.00 it/s loss=0.1235 lr=0.01 epoch=3 mode=poly" in line
    assert screen(stream.getvalue()) == [line]  # redrawn in place


def test_throttling_and_final_step_always_drawn():
    bar, stream, clock = make_bar(total=5, min_interval=1.0)
    bar.update()
    assert draws(stream) == 1
    clock.now = 0.5
    bar.update()
    bar.update()
    assert draws(stream) == 1
    clock.now = 1.0
    bar.update()
    assert draws(stream) == 2 and " 4/5 " in shown(stream)
    clock.now = 1.1
    bar.update()
    assert draws(stream) == 3 and " 5/5 " in shown(stream)


def test_set_position_and_restart_clock_leave_skipped_and_slow_steps_out_of_the_rate():
    bar, stream, clock = make_bar(total=1000)
    bar.set_position(900)  # resumed
    assert " 900/1000 " in shown(stream) and "? it/s" in shown(stream)
    clock.now = 60.0  # compiling
    bar.update(1)
    bar.restart_clock()
    for _ in range(10):
        clock.now += 2.0
        bar.update(1)
    assert " 911/1000 0:00:20 0:02:58 0.50 it/s" in shown(stream)


def test_unknown_total_shows_counts_only():
    bar, stream, clock = make_bar(total=0)
    for _ in range(8):
        clock.now += 0.5
        bar.update(1)
    assert " 8/? 0:00:04 " in shown(stream) and "2.00 it/s" in shown(stream)
    with pytest.raises(ValueError):
        ProgressBar(-1, stream=FakeTTY())


def test_a_long_postfix_is_cut_to_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    bar, stream, clock = make_bar(total=10, description="evaluating", min_interval=0.0)
    log = bar.interleave(lambda message: stream.write(message + "\n"))
    for step in range(1, 4):
        clock.now += 1.0
        bar.update(1, miou=0.5, note="x" * 100)
        log(f"line {step}")
    rows = screen(stream.getvalue())
    assert rows[:3] == ["line 1", "line 2", "line 3"] and len(rows) == 4
    assert rows[3].startswith("evaluating") and " 3/10 " in rows[3] and rows[3].endswith("…")
    assert len(rows[3]) <= 80


def test_log_lines_appear_above_the_bar():
    bar, stream, clock = make_bar(total=10)
    log = bar.interleave(lambda message: stream.write(message + "\n"))
    log("before the first step")  # nothing to erase yet
    for step in range(1, 4):
        clock.now += 1.0
        bar.update(1)
        log(f"step {step} loss 0.5")
    rows = screen(stream.getvalue())
    assert rows[:4] == [
        "before the first step",
        "step 1 loss 0.5",
        "step 2 loss 0.5",
        "step 3 loss 0.5",
    ]
    assert len(rows) == 5 and rows[4].startswith("train ") and " 3/10 " in rows[4]
    bar.close()
    log("after the bar")
    assert screen(stream.getvalue())[-2:] == ["after the bar", ""]


def test_close_leaves_the_final_state_and_ends_the_line_once():
    bar, stream, clock = make_bar(total=10, min_interval=5.0)
    with bar:
        bar.update()
        clock.now = 1.0
        bar.update(2)  # not drawn yet (throttled)
    rows = screen(stream.getvalue())
    assert len(rows) == 2 and " 3/10 " in rows[0] and rows[1] == ""
    written = stream.getvalue()
    bar.close()
    bar.update()
    assert stream.getvalue() == written


def test_close_without_drawing_writes_nothing():
    bar, stream, _ = make_bar()
    bar.close()
    assert stream.getvalue() == ""


def test_off_a_terminal_log_every_prints_plain_lines():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(100, "inspecting", stream=stream, clock=clock, log_every=5.0)
    assert not bar.enabled
    with bar:
        for _ in range(100):
            clock.now += 0.25
            bar.update()
    assert stream.getvalue().splitlines() == [
        "inspecting 20/100 (20%), 4.0 it/s, about 0:20 left",
        "inspecting 40/100 (40%), 4.0 it/s, about 0:15 left",
        "inspecting 60/100 (60%), 4.0 it/s, about 0:10 left",
        "inspecting 80/100 (80%), 4.0 it/s, about 0:05 left",
        "inspecting 100/100 (100%), 4.0 it/s, about 0:00 left",
    ]
    short = io.StringIO()
    with ProgressBar(3, "inspecting", stream=short, clock=FakeClock(), log_every=5.0) as bar:
        bar.update(3)  # done before the first line was due: silent
    assert short.getvalue() == ""


def test_formatting_helpers():
    assert format_duration(5.9) == "0:05"
    assert format_duration(754) == "12:34"
    assert format_duration(3723) == "1:02:03"
    assert format_value(12345.678) == "1.235e+04"
    assert format_value(np.array(0.25, np.float32)) == "0.25"
    assert format_value(7) == "7"
    assert format_value("sgd") == "sgd"
