"""mcibi_jax.distributed: settings checks, and two real CPU processes running one global computation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from mcibi_jax import distributed
from mcibi_jax.distributed import DistributedConfigError, managed_cluster, resolve_settings
from tests.helpers import REPO, free_port, run_python, subprocess_env

# Each process holds rows (pid + 1) * [1, 2, 3] (2 rows of them) of a global (4, 3) array laid
# out over a 1-D mesh of both processes' devices; the jitted reductions need both halves.
WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mcibi_jax import distributed
    assert distributed.initialize(initialization_timeout=30)
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    pid = jax.process_index()
    local = np.tile((pid + 1) * np.arange(1, 4, dtype=np.float32), (2, 1))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    reduce = jax.jit(lambda a: (a.sum(), a.mean(axis=0)), out_shardings=NamedSharding(mesh, P()))
    total, column_mean = reduce(x)
    # the same host values on both processes -> one replicated global tree (a typed key included)
    from mcibi_jax.sharding import replicate
    tree = replicate({"w": np.arange(3, dtype=np.float32), "step": np.int32(5), "key": jax.random.key(7)}, mesh)
    combine = jax.jit(lambda t, a: (a * t["w"]).sum() + t["step"] + jax.random.uniform(t["key"]),
                      out_shardings=NamedSharding(mesh, P()))
    combined = combine(tree, x)
    print("RESULT " + json.dumps({
        "pid": pid, "count": jax.process_count(), "devices": jax.device_count(),
        "main": distributed.is_main_process(), "shape": list(x.shape), "total": float(total),
        "mean": np.asarray(column_mean).tolist(), "combined": float(combined),
        "replicated": all(leaf.is_fully_replicated and not leaf.is_fully_addressable for leaf in jax.tree.leaves(tree)), "describe": distributed.describe()}), flush=True)
    jax.distributed.shutdown()
""")


def test_two_cpu_processes_compute_one_global_result():
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(
                MCIBI_COORDINATOR=f"127.0.0.1:{port}",
                MCIBI_NUM_PROCESSES="2",
                MCIBI_PROCESS_ID=str(i),
            ),
        )
        for i in range(2)
    ]
    outputs = []
    deadline = time.monotonic() + 240  # for both processes together; then they are killed
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = [
        json.loads(line.split("RESULT ", 1)[1])
        for out in outputs
        for line in out.splitlines()
        if line.startswith("RESULT ")
    ]
    assert sorted(r["pid"] for r in results) == [0, 1], outputs
    assert results[0]["combined"] == results[1]["combined"]
    for r in results:
        assert r["count"] == 2 and r["devices"] == 2 and r["shape"] == [4, 3]
        assert r["main"] == (r["pid"] == 0)
        # rows: 2 x [1, 2, 3] and 2 x [2, 4, 6]
        assert r["total"] == pytest.approx(36.0)
        assert r["mean"] == pytest.approx([1.5, 3.0, 4.5])
        assert r["replicated"]
        # rows . w = 2 * 8 + 2 * 16, + step 5, + a uniform draw in [0, 1) that both processes share
        assert 53.0 <= r["combined"] < 54.0
        assert r["describe"].startswith(f"process {r['pid']}/2: 1 local of 2 cpu")


def test_single_process_is_a_no_op(monkeypatch):
    for var in (
        distributed.ENV_COORDINATOR,
        distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID,
    ):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize(auto_detect=False) is False
    assert distributed.initialize("localhost:1234", 1, 0) is False
    assert distributed.is_main_process()


def test_replicate_in_one_process():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    from mcibi_jax.sharding import replicate

    tree = replicate({"a": np.ones((2, 2), np.float32), "key": jax.random.key(0)}, mesh)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(tree))
    np.testing.assert_array_equal(tree["a"], np.ones((2, 2)))


def test_settings_from_env_and_arguments():
    env = {
        "MCIBI_COORDINATOR": "10.0.0.1:1234",
        "MCIBI_NUM_PROCESSES": "4",
        "MCIBI_PROCESS_ID": "3",
        "MCIBI_LOCAL_DEVICE_IDS": "0,1",
    }
    assert resolve_settings(environ=env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "local_device_ids": [0, 1],
    }
    # arguments win over the environment
    got = resolve_settings("h:9", 2, 0, [5], environ=env)
    assert got == {
        "coordinator_address": "h:9",
        "num_processes": 2,
        "process_id": 0,
        "local_device_ids": [5],
    }
    assert resolve_settings(environ={}) is None


@pytest.mark.parametrize(
    "args, env, message",
    [
        (
            (None, None, None),
            {"MCIBI_COORDINATOR": "h:1"},
            r"num_processes \(MCIBI_NUM_PROCESSES\)",
        ),
        (("h:1", 2, None), {}, "process_id"),
        ((None, 2, 1), {}, "coordinator_address"),
        (("h", 2, 1), {}, "host:port"),
        (("h:1", 2, 2), {}, r"process_id must be in \[0, 2\)"),
        (("h:1", 0, 0), {}, "at least 1"),
        (("h:1", "two", 0), {}, "must be an integer"),
    ],
)
def test_partial_or_invalid_settings_are_rejected(args, env, message):
    with pytest.raises(DistributedConfigError, match=message):
        resolve_settings(*args, environ=env)


def test_managed_cluster_detection():
    assert managed_cluster({}) is None
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    assert managed_cluster({**slurm, "SLURM_NTASKS": "4"}) == "slurm"
    assert managed_cluster({**slurm, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}) == "slurm"
    assert managed_cluster({**slurm, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert managed_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
    # no job step
    assert managed_cluster({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None
    assert (
        managed_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://x:1", "OMPI_COMM_WORLD_SIZE": "2"})
        == "ompi"
    )
    assert managed_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert managed_cluster({"TPU_WORKER_HOSTNAMES": "a,b", "JAX_PLATFORMS": "cpu"}) is None


def test_replicate_over_several_devices_copies_what_the_step_donates():
    """The state given to the donating train step must not be the caller's arrays: with several
    devices, jax's device_put reused an array already on the first device (the caller's ported
    weights were deleted by the first step)."""

    script = (
        "import jax, jax.numpy as jnp\n"
        "from mcibi_jax.sharding import data_mesh, replicate\n"
        "mine = {'w': jnp.ones((4, 4)), 'key': jax.random.key(0)}\n"
        "state = replicate(mine, data_mesh(jax.devices()))\n"
        "step = jax.jit(lambda s: {'w': s['w'] + 1, 'key': s['key']}, donate_argnums=0)\n"
        "jax.block_until_ready(step(state))\n"
        "print('DEVICES', len(jax.devices()), 'SUM', float(mine['w'].sum()))\n"
    )
    result = run_python(script, devices=8, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DEVICES 8 SUM 16.0" in result.stdout
