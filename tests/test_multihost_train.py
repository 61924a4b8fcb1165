"""Two processes on localhost train and evaluate the demo together and get what one process gets."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.helpers import DEMO_FAST, REPO, free_port, subprocess_env

COMMAND = [
    sys.executable,
    "-m",
    "mcibi_jax.main",
    f"--config={REPO / 'configs' / 'demo.py'}",
    "--mode=train_and_eval",
    *[f"--config.{o}" for o in DEMO_FAST],
    "--config.train.num_epochs=1",
]


def _run(workdir, processes: int, devices_per_process: int) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for i in range(processes):
        env = subprocess_env(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}"
        )
        if processes > 1:
            env.update(
                MCIBI_COORDINATOR=f"127.0.0.1:{port}",
                MCIBI_NUM_PROCESSES=str(processes),
                MCIBI_PROCESS_ID=str(i),
            )
        procs.append(
            subprocess.Popen(
                [*COMMAND, f"--workdir={workdir}"],
                cwd=REPO,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    deadline, done = time.monotonic() + 240, []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append((proc.returncode, out))
    finally:
        for proc in procs:
            proc.kill()
    for code, out in done:
        assert code == 0, out[-3000:]
    return done


def test_two_processes_train_like_one(tmp_path):
    _run(tmp_path / "one", processes=1, devices_per_process=2)
    outputs = _run(tmp_path / "two", processes=2, devices_per_process=1)
    one_results = json.loads((tmp_path / "one" / "results.json").read_text())
    two_results = json.loads((tmp_path / "two" / "results.json").read_text())
    one, two = one_results["train"], two_results["train"]
    assert one["steps"] == two["steps"] > 0
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    assert "training" not in outputs[1][1]  # only process 0 reports progress
    assert (tmp_path / "two" / "checkpoints" / "final").is_dir()
    # the evaluation: each process scores its half of the images, the counts are summed
    assert one_results["eval"]["num_images"] == two_results["eval"]["num_images"] == 16
    assert abs(one_results["eval"]["mIoU"] - two_results["eval"]["mIoU"]) < 0.1  # percent
    assert (tmp_path / "two" / "checkpoints" / "best" / "best.json").exists()
