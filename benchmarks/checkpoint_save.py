"""How long a training checkpoint holds the step, and how long it takes to reach the disk.

    python benchmarks/checkpoint_save.py                                   # R-50 Cityscapes train state
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/checkpoint_save.py
    python benchmarks/checkpoint_save.py --configs=configs/ade20k.py:vitl --saves=2
    python benchmarks/checkpoint_save.py --replica_parallel_min_bytes=0   # replicas write slices of every array

Saves the whole train state of each config (params, SGD momentum, BatchNorm statistics,
memory; values are zeros, shapes are the model's) replicated over every device, ``--saves``
times with :class:`~mcibi_jax.train.checkpoints.TrainCheckpoints` into a temporary directory,
as the train loop does. Prints per save the time ``save`` held the caller (the training step
waits that long: the copy off the devices, and on the first save the setup) and the time
until the files were complete (written in the background while training goes on).
By default, as in training, replicated arrays are written by their replicas together (each a
slice) only across processes; ``--replica_parallel_min_bytes=N`` has them do so within this
process too, from slices of N bytes on (:data:`~mcibi_jax.train.checkpoints.REPLICA_PARALLEL_MIN_BYTES`
in training).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import mcibi_jax
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.sharding import data_mesh, replicate
from mcibi_jax.train import checkpoints
from mcibi_jax.train.optimizer import optimizer_from_config
from mcibi_jax.train.state import create_train_state


def zero_train_state(config):
    """The train state of ``config``'s model and optimizer, every value zero (nothing compiled)."""
    model = build_model(config.model)
    shapes = jax.eval_shape(  # no variable's shape depends on the image size
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    variables = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    tx, _ = optimizer_from_config(variables["params"], config.train, 100)
    return create_train_state(variables, tx)


def time_saves(state, saves: int, min_bytes: int | None) -> list[tuple[float, float]]:
    """(seconds ``save`` held the caller, seconds until on disk) of each of ``saves`` saves."""
    times = []
    with tempfile.TemporaryDirectory(prefix="mcibi_save_bench_") as directory:
        train_checkpoints = checkpoints.TrainCheckpoints(
            Path(directory) / "train_state", keep=2, replica_parallel_min_bytes=min_bytes
        )
        try:
            for step in range(1, saves + 1):
                started = time.perf_counter()
                train_checkpoints.save(state.replace(step=jnp.asarray(step, jnp.int32)), {})
                returned = time.perf_counter()
                train_checkpoints.wait()
                times.append((returned - started, time.perf_counter() - started))
        finally:
            train_checkpoints.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default="configs/cityscapes.py:r50", help="comma-separated config specs"
    )
    parser.add_argument("--saves", type=int, default=3, help="saves per config (default 3)")
    parser.add_argument(
        "--replica_parallel_min_bytes",
        type=int,
        default=None,
        help="replicas write slices of N bytes or more within this process too",
    )
    args = parser.parse_args(argv)
    if args.saves < 1:
        parser.error("--saves must be at least 1")
    min_bytes = args.replica_parallel_min_bytes
    if min_bytes is not None:
        slices = f"from {min_bytes} bytes a slice"
    elif jax.process_count() > 1:
        slices = f"from {checkpoints.REPLICA_PARALLEL_MIN_BYTES} bytes a slice"
    else:
        slices = "off"
    mesh = data_mesh()
    print(
        f"{jax.process_count()} process(es), {jax.device_count()} {jax.default_backend()} "
        f"device(s), replica-parallel writes {slices}",
        flush=True,
    )
    for spec in args.configs.split(","):
        config = mcibi_jax.load_config(spec)
        state = replicate(zero_train_state(config), mesh)
        leaves = jax.tree_util.tree_leaves(state)
        megabytes = sum(leaf.nbytes for leaf in leaves) / 2**20
        for index, (held, done) in enumerate(time_saves(state, args.saves, min_bytes), 1):
            print(
                f"{spec}: {len(leaves)} arrays, {megabytes:.1f} MiB; save {index}: held the "
                f"step {held:.2f} s, on disk after {done:.2f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
