"""The terminal progress bar: enabling rules, line format, throttling, resuming, fitting, log lines."""

from __future__ import annotations

import io
import os
import shutil

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
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((200, 50)))


def make_bar(total: int = 10, **kwargs) -> tuple[ProgressBar, FakeTTY, FakeClock]:
    stream, clock = FakeTTY(), FakeClock()
    kwargs.setdefault("description", "train")
    return ProgressBar(total, stream=stream, clock=clock, **kwargs), stream, clock


def last_line(stream: io.StringIO) -> str:
    return stream.getvalue().split("\r")[-1].rstrip(" ")


def screen(text: str) -> list[str]:
    """What a terminal shows after printing `text` (handles only \\r and \\n)."""
    lines, col = [""], 0
    for ch in text:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("")
            col = 0
        else:
            line = lines[-1].ljust(col)
            lines[-1] = line[:col] + ch + line[col + 1:]
            col += 1
    return [line.rstrip(" ") for line in lines]


def test_disabled_on_a_plain_stream_writes_nothing():
    stream = io.StringIO()
    bar = ProgressBar(5, stream=stream)
    assert not bar.enabled
    with bar:
        bar.update(3, loss=1.0)
        bar.set_position(4)
        bar.write("hello")
        bar.clear()
    assert stream.getvalue() == ""


def test_enabled_on_a_terminal():
    bar, stream, _ = make_bar()
    assert bar.enabled
    bar.update()
    assert stream.getvalue().startswith("\rtrain |")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("MCIBI_PROGRESS", "0")
    assert not ProgressBar(3, stream=FakeTTY()).enabled
    monkeypatch.setenv("MCIBI_PROGRESS", "1")
    assert ProgressBar(3, stream=io.StringIO()).enabled
    assert not ProgressBar(3, stream=io.StringIO(), enabled=False).enabled


def test_rate_eta_and_postfix():
    bar, stream, clock = make_bar(total=100)
    clock.now = 10.0
    bar.update(20, loss=0.123456, lr=np.float32(0.01), epoch=3, mode="poly")
    expected = ("train |####....................| 20/100 [0:10<0:40, 2.00 it/s]"
                " loss=0.1235 lr=0.01 epoch=3 mode=poly")
    assert last_line(stream) == expected
    clock.now = 3700.0
    bar.update(5)
    assert "25/100 [1:01:40<" in last_line(stream)
    assert last_line(stream).endswith("loss=0.1235 lr=0.01 epoch=3 mode=poly")


def test_throttling_and_final_step_always_drawn():
    bar, stream, clock = make_bar(total=5, min_interval=1.0)
    bar.update()
    assert stream.getvalue().count("\r") == 1
    clock.now = 0.5
    bar.update()
    bar.update()
    assert stream.getvalue().count("\r") == 1
    clock.now = 1.0
    bar.update()
    assert stream.getvalue().count("\r") == 2
    assert " 4/5 " in last_line(stream)
    clock.now = 1.1
    bar.update()
    assert stream.getvalue().count("\r") == 3
    assert "|" + "#" * 24 + "| 5/5 " in last_line(stream)


def test_set_position_does_not_count_towards_the_rate():
    bar, stream, clock = make_bar(total=1000)
    bar.set_position(900)
    assert " 900/1000 [0:00<?, 0.00 it/s]" in last_line(stream)
    clock.now = 20.0
    bar.update(10)
    assert " 910/1000 [0:20<3:00, 0.50 it/s]" in last_line(stream)


def test_unknown_total_shows_counts_only():
    bar, stream, clock = make_bar(total=0, description="")
    clock.now = 4.0
    bar.update(8)
    assert last_line(stream) == "8 [0:04, 2.00 it/s]"
    with pytest.raises(ValueError):
        ProgressBar(-1, stream=FakeTTY())


def test_fits_the_terminal_width(monkeypatch):
    columns = [80]
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((columns[0], 50)))
    bar, stream, clock = make_bar(total=10, description="eval", min_interval=0.0)
    bar.update(1, miou=0.5, note="x" * 100)
    line = last_line(stream)
    assert len(line) == 79
    assert line.startswith("eval |##....") and line.endswith(" miou=0.5 note=" + "x" * 8)
    columns[0] = 20
    bar.update(1)
    assert last_line(stream) == "eval |####........."


def test_shorter_line_overwrites_the_previous_one():
    bar, stream, clock = make_bar(total=10, min_interval=0.0)
    bar.update(1, msg="a long postfix value")
    bar.postfix.clear()
    bar.update(1)
    assert screen(stream.getvalue()) == [last_line(stream)]
    assert last_line(stream).endswith("it/s]")


def test_write_puts_the_message_on_its_own_line_and_redraws():
    bar, stream, clock = make_bar(total=10)
    bar.update(3)
    drawn = stream.getvalue()
    bar.write("epoch 1 done")
    rest = stream.getvalue()[len(drawn):]
    blank, message, redraw = rest.split("\r", 1)[1].partition("epoch 1 done\n")
    assert blank.strip() == "" and message == "epoch 1 done\n"
    assert redraw.startswith("\rtrain |") and " 3/10 " in redraw
    assert screen(stream.getvalue()) == ["epoch 1 done", last_line(stream)]


def test_close_ends_with_a_newline_once():
    bar, stream, clock = make_bar(total=10, min_interval=5.0)
    with bar:
        bar.update()
        clock.now = 1.0
        bar.update(2)
    shown = screen(stream.getvalue())
    assert stream.getvalue().endswith("\n") and len(shown) == 2 and shown[1] == ""
    assert " 3/10 " in shown[0]
    bar.close()
    bar.update()
    assert stream.getvalue().count("\n") == 1


def test_close_without_drawing_writes_nothing():
    bar, stream, _ = make_bar()
    bar.close()
    assert stream.getvalue() == ""


def test_formatting_helpers():
    assert format_duration(5.9) == "0:05"
    assert format_duration(754) == "12:34"
    assert format_duration(3723) == "1:02:03"
    assert format_value(12345.678) == "1.235e+04"
    assert format_value(np.array(0.25, np.float32)) == "0.25"
    assert format_value(7) == "7"
    assert format_value("sgd") == "sgd"


def test_restart_clock_leaves_a_slow_first_step_out_of_the_rate():
    bar, stream, clock = make_bar(total=100)
    clock.now = 60.0  # compiling
    bar.update(1)
    bar.restart_clock()
    clock.now = 70.0
    bar.update(10)
    assert "11/100 [0:10<1:29, 1.00 it/s]" in last_line(stream)
