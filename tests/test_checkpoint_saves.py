"""Training checkpoints are saved in the background, atomically: a process killed in the middle
of a save resumes from the checkpoint before."""

from __future__ import annotations

import logging
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
from tests.helpers import run_python, tiny_ade20k_config, write_ade20k


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

    proc = run_python(KILLED_IN_SAVE, str(tmp_path / "ade"), str(tmp_path / "b"), timeout=600)
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


SLICED_ON_SAVE = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, optax
    from orbax.checkpoint._src.serialization import replica_slices
    from mcibi_jax.sharding import data_mesh, replicate
    from mcibi_jax.train import checkpoints
    from mcibi_jax.train.state import create_train_state

    sliced, original = set(), replica_slices.ReplicaSlice.data

    def data(self):
        if self.slice_args is not None:
            sliced.add(tuple(self.unsliced_data.shape))
        return original(self)

    replica_slices.ReplicaSlice.data = data
    params = {f"small{i}": jnp.ones((i + 1, 64)) for i in range(8)}
    params["large"] = jnp.ones((1024, 512))  # 2 MiB: 1 MiB for each of the 2 replicas
    variables = {"params": params, "batch_stats": {}, "memory": {"m": jnp.ones((4, 8))}}
    state = replicate(create_train_state(variables, optax.sgd(0.1)), data_mesh())
    for name, min_bytes in (("default", None), ("forced", 1 << 20)):
        sliced.clear()
        saves = checkpoints.TrainCheckpoints(sys.argv[1] + name, replica_parallel_min_bytes=min_bytes)
        saves.save(state)
        saves.close()
        print("SLICED", name, sorted(sliced))
""")


def test_replicas_write_slices_only_across_processes_and_of_large_arrays(tmp_path):
    """Slicing a replicated array for its replicas to write in parallel costs an op on the
    device (compiled for each new shape): with every array sliced, the first save of the R-50
    train state on 8 devices of one process held the step for 31 s."""
    proc = run_python(SLICED_ON_SAVE, str(tmp_path / "train_state_"), devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SLICED default []" in proc.stdout, proc.stdout[-2000:]  # one process: none
    assert "SLICED forced [(1024, 512)]" in proc.stdout, proc.stdout[-2000:]


def test_states_saved_by_orbax_standard_handler_still_resume(tmp_path):
    """Train states written before the arrays had their own handler options (orbax's
    StandardSave, 2026-12-02 to -03) restore with every value."""
    import orbax.checkpoint as ocp

    state = _state(5)
    state = state.replace(opt_state=jax.tree_util.tree_map(lambda x: x + 7, state.opt_state))
    manager = ocp.CheckpointManager(
        tmp_path / "train_state",
        options=ocp.CheckpointManagerOptions(create=True),
        item_names=("state", "data"),
    )
    manager.save(
        5,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=checkpoints.ProcessDataSave({"position": 3}),
        ),
    )
    manager.wait_until_finished()
    manager.close()
    saves = TrainCheckpoints(tmp_path / "train_state")
    try:
        restored, data = saves.restore_latest(_state(0))
    finally:
        saves.close()
    assert int(restored.step) == 5 and data == {"position": 3}
    for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
