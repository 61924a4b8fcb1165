"""Ctrl-C / SIGTERM during training: a checkpoint at the next step, one line naming it and the
command that resumes, exit status 128 + signal; a second signal exits at once; the rerun
resumes (inside an epoch) and trains exactly like an uninterrupted run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.helpers import REPO, MainRun, subprocess_env

# A demo run small enough to compile in seconds: 4 steps per epoch, 2 epochs.
TINY_DEMO = textwrap.dedent("""
    import mcibi_jax
    from tests.helpers import DEMO_CONFIG

    def get_config():
        config = mcibi_jax.load_config(DEMO_CONFIG, [
            "dataset.image_size=(32, 32)", "dataset.train.num_images=16", "dataset.test.num_images=4",
            "train.batch_size=4", "train.num_epochs=2", "train.log_every=1", "train.eval_every=0",
            "model.backbone.base_channels=4", "model.backbone.stem_channels=8", "model.head.in_channels=32",
            "model.head.feats_channels=16", "model.head.transform_channels=8", "model.head.out_channels=16"])
        config.model.auxiliary[0].update(in_channels=16, out_channels=16)
        return config
""")


def _history(workdir: Path) -> dict[int, float]:
    return {
        e["step"]: e["loss"]
        for e in json.loads((workdir / "results.json").read_text())["train"]["history"]
    }


def test_ctrl_c_during_compilation_saves_then_the_rerun_resumes(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY_DEMO)
    args = [f"--config={tmp_path / 'tiny.py'}", "--mode=train"]
    straight = MainRun([*args, f"--workdir={tmp_path / 'a'}"])
    assert straight.finish() == 0, straight.output[-3000:]

    first = MainRun([*args, f"--workdir={tmp_path / 'b'}"])
    first.wait_for(r"^training [\d,]+ parameters")  # the first step is compiling now
    first.proc.send_signal(signal.SIGINT)
    assert first.finish() == 128 + signal.SIGINT, first.output[-3000:]
    stopped = first.wait_for(r"^stopped by SIGINT")
    assert re.search(
        r"at step (\d)/8; saved .*train_state/\1\. Resume with the same command: python\S* -m mcibi_jax.main "
        + re.escape(f"--config={tmp_path / 'tiny.py'}"),
        stopped,
    ), stopped
    assert "Traceback" not in first.output and "Fatal" not in first.output
    step = int(re.search(r"at step (\d)", stopped).group(1))
    assert (tmp_path / "b" / "train_state" / str(step) / "data" / "process_0-of-1.json").exists()

    rerun = MainRun([*args, f"--workdir={tmp_path / 'b'}"])
    assert rerun.finish() == 0, rerun.output[-3000:]
    assert f"resuming from {tmp_path / 'b' / 'train_state'} at step {step}" in rerun.output
    want, got = _history(tmp_path / "a"), _history(tmp_path / "b")
    for at in range(
        step + 1, 9
    ):  # inside the first epoch too: the batches continue where they stopped
        assert got[at] == want[at], (at, got[at], want[at])


SLEEPER = textwrap.dedent("""
    import ctypes, time
    from mcibi_jax.train.interrupt import StopRequests
    with StopRequests() as stop:
        print("READY", flush=True)
        while not stop.requested:
            time.sleep(0.01)
        print("REQUESTED", flush=True)
        while True:  # long native calls (an XLA compilation), between which Python handlers would run
            ctypes.CDLL(None).sleep(60)
""")


def test_a_second_signal_exits_at_once():
    proc = subprocess.Popen(
        [sys.executable, "-c", SLEEPER],
        cwd=REPO,
        env=subprocess_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGINT)
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert any(line.startswith("REQUESTED") for line in lines), lines
        assert any("Ctrl-C again exits at once" in line for line in lines), lines
        time.sleep(0.5)
        assert proc.poll() is None  # the first signal only asks
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
        assert time.monotonic() - sent < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT
    assert "SIGINT again: exiting now without saving" in rest and "Traceback" not in rest
