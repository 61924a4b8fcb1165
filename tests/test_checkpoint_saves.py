"""Training checkpoints are saved in the background, atomically: a process killed in the middle
of a save resumes from the checkpoint before."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mcibi_jax.porting.variables import load_variables
from mcibi_jax.train import checkpoints
from mcibi_jax.train.checkpoints import TrainCheckpoints
from mcibi_jax.train.experiment import run
from mcibi_jax.train.state import create_train_state
from tests.helpers import REPO, subprocess_env, tiny_ade20k_config, write_ade20k


def _state(step: int):
    variables = {"params": {"w": jnp.arange(4.0)}, "batch_stats": {}, "memory": {"m": jnp.ones(3)}}
    return create_train_state(variables, optax.sgd(0.1)).replace(step=jnp.asarray(step, jnp.int32))


def test_save_returns_before_the_files_are_written(tmp_path, monkeypatch, caplog):
    release = threading.Event()
    original = checkpoints.ProcessDataHandler.write

    def slow_write(path, text):
        release.wait(timeout=30)  # the disk is slow
        original(path, text)

    monkeypatch.setattr(checkpoints.ProcessDataHandler, "write", staticmethod(slow_write))
    saves = TrainCheckpoints(tmp_path / "train_state", keep=2)
    try:
        started = time.monotonic()
        path = saves.save(_state(1), {"position": 7})
        # training goes on meanwhile
        assert time.monotonic() - started < 20 and not release.is_set()
        assert not (tmp_path / "train_state" / "1").exists()  # not final yet
        threading.Timer(1.5, release.set).start()
        with caplog.at_level(logging.WARNING):
            # waits for the first one, without orbax's warning
            saves.save(_state(2), {"position": 9})
            saves.save(_state(3), {"position": 11})
        saves.wait()
        assert not [r for r in caplog.records if "Waiting for previous save" in r.getMessage()]
        assert path == tmp_path / "train_state" / "1"
        assert sorted(
            int(p.name) for p in (tmp_path / "train_state").iterdir() if p.name.isdigit()
        ) == [2, 3]  # keep=2
        state, data = saves.restore_latest(_state(0))
        assert int(state.step) == 3 and data == {"position": 11}
        assert (tmp_path / "train_state" / "3" / "data" / "process_0-of-1.json").exists()
    finally:
        release.set()
        saves.close()


KILLED_IN_SAVE = textwrap.dedent("""
    import os, signal, sys
    from mcibi_jax.train import checkpoints
    from mcibi_jax.train.experiment import run
    from tests.helpers import tiny_ade20k_config

    original, calls = checkpoints.ProcessDataHandler.write, []

    def write(path, text):
        calls.append(path)
        if len(calls) == 3:  # the third checkpoint, written in the background: nothing of it is final
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, text)

    checkpoints.ProcessDataHandler.write = staticmethod(write)
    config = tiny_ade20k_config(sys.argv[1])
    config.train.num_epochs = 3
    run(config, sys.argv[2], mode="train", log=print)
""")


def test_killed_in_the_middle_of_a_save_resumes_from_the_checkpoint_before(tmp_path):
    write_ade20k(tmp_path / "ade")
    config = tiny_ade20k_config(tmp_path / "ade")
    config.train.num_epochs = 3
    straight = run(config, tmp_path / "a", mode="train", log=lambda _: None)

    proc = subprocess.run(
        [sys.executable, "-c", KILLED_IN_SAVE, str(tmp_path / "ade"), str(tmp_path / "b")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "b" / "train_state").iterdir())
    assert (
        "1" in names
        and "2" in names
        and "3" not in names
        and any(".orbax-checkpoint-tmp" in n for n in names)
    ), names

    lines = []
    resumed = run(config, tmp_path / "b", mode="train", log=lines.append)
    assert any(
        f"resuming from {tmp_path / 'b' / 'train_state'} at step 2" in line for line in lines
    ), lines
    assert not any(
        ".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "b" / "train_state").iterdir()
    )
    a, b = (
        load_variables(straight["checkpoint"], config),
        load_variables(resumed["checkpoint"], config),
    )
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
