"""Two processes on localhost, reading a dataset in ADE20K's layout: preempted (SIGTERM on one
host) after a periodic checkpoint, failing on one host, the rerun resumes, and the run ends with
the losses of an uninterrupted one (each host restores its own input-pipeline state)."""

from __future__ import annotations

import json
import shutil
import signal
import textwrap
import time
from pathlib import Path

from tests.helpers import MainRun, free_port, write_ade20k

STEPS = 15  # one step per epoch (2 training images, batch 2); a checkpoint every 3

CONFIG = textwrap.dedent("""
    from tests.helpers import tiny_ade20k_config

    def get_config():
        config = tiny_ade20k_config({root!r})
        config.train.update(num_epochs={steps}, checkpoint_every=3, eval_every=0, keep_checkpoints=2)
        # a ResNet-18-like backbone compiles faster than the recipe's ResNet-50
        config.model.backbone.update(depth=18, structure_type="resnet18conv3x3stem")
        config.model.head.in_channels = 32
        config.model.auxiliary[0].update(in_channels=16)
        return config
""")


def _start(config: Path, workdir: Path, processes: int) -> list[MainRun]:
    args = [f"--config={config}", "--mode=train", f"--workdir={workdir}"]
    if processes == 1:
        return [MainRun(args, XLA_FLAGS="--xla_force_host_platform_device_count=2")]
    port = free_port()
    return [
        MainRun(
            args,
            MCIBI_COORDINATOR=f"127.0.0.1:{port}",
            MCIBI_NUM_PROCESSES="2",
            MCIBI_PROCESS_ID=str(i),
        )
        for i in range(processes)
    ]


def _finish(runs: list[MainRun], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    return [run.finish(timeout=max(1.0, deadline - time.monotonic())) for run in runs]


def _history(workdir: Path) -> dict[int, float]:
    return {
        e["step"]: e["loss"]
        for e in json.loads((workdir / "results.json").read_text())["train"]["history"]
    }


def _wait_until(condition, timeout: float, what: str, runs: list[MainRun]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(run.proc.poll() is not None for run in runs):
            raise AssertionError(
                f"no {what}:\n" + "\n----\n".join(run.output[-2000:] for run in runs)
            )
        time.sleep(0.1)


def test_two_processes_resume_after_preemption_and_a_failing_host(tmp_path):
    write_ade20k(tmp_path / "ade")
    config = tmp_path / "tiny_ade.py"
    config.write_text(CONFIG.format(root=str(tmp_path / "ade"), steps=STEPS))

    # 1 process x 2 devices: the same global batches
    reference = _start(config, tmp_path / "ref", processes=1)
    assert _finish(reference) == [0], reference[0].output[-3000:]

    # After the first periodic checkpoint, SIGTERM on process 1 alone (a preemption notice) stops
    # both hosts at one step, each saving its input-pipeline state. (A SIGKILL in the middle of a
    # save is tests/test_checkpoint_saves.py's.)
    work = tmp_path / "w"
    runs = _start(config, work, processes=2)
    _wait_until(lambda: (work / "train_state" / "3").is_dir(), 600, "first checkpoint", runs)
    runs[1].proc.send_signal(signal.SIGTERM)
    codes = _finish(runs)
    combined = "".join(run.output for run in runs)
    assert codes == [128 + signal.SIGTERM] * 2, combined[-3000:]
    stopped = runs[0].wait_for(rf"^stopped by SIGTERM at step \d+/{STEPS}; saved ")
    assert "Resume with the same command on every host" in stopped and "Traceback" not in combined
    step = int(stopped.split("at step ")[1].split("/")[0])
    assert 3 <= step < STEPS
    for saved in {3, step} & {
        int(p.name) for p in (work / "train_state").iterdir() if p.name.isdigit()
    }:
        data = work / "train_state" / str(saved) / "data"
        assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in data.iterdir()}
    assert (work / "train_state" / str(step)).is_dir()

    # A host that cannot resume (here: process 1's data state belongs to another host) stops both at once.
    broken = tmp_path / "broken"
    shutil.copytree(work, broken)
    state_file = broken / "train_state" / str(step) / "data" / "process_1-of-2.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "shard_index": 0}))
    runs = _start(config, broken, processes=2)
    codes = _finish(runs, timeout=120)
    combined = "".join(run.output for run in runs)
    assert codes == [1, 1], combined[-3000:]
    errors = [line for line in combined.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "shard_index: saved 0, now 1" in errors[0], combined[-3000:]
    assert "Traceback" not in combined

    # The rerun resumes on both hosts and ends with the losses of the uninterrupted run.
    runs = _start(config, work, processes=2)
    assert _finish(runs) == [0, 0], "\n----\n".join(run.output[-3000:] for run in runs)
    assert f"at step {step} " in runs[0].output
    want, got = _history(tmp_path / "ref"), _history(work)
    for at in range(step + 1, STEPS + 1):
        assert abs(got[at] - want[at]) <= 1e-6 * abs(want[at]), (at, got[at], want[at])
