"""Training-step throughput, compile time and peak memory of the released recipes.

    python benchmarks/train_step.py                      # every backbone, its recipe's crop and per-device batch, float32 and bfloat16
    python benchmarks/train_step.py --configs=configs/cityscapes.py:r50 --size=128x128 --iters=2
    python benchmarks/train_step.py --per_device_batch=4 --dtypes=bfloat16
    python benchmarks/train_step.py --configs=configs/cityscapes.py:r101 --set=model.backbone.scan_blocks=True

Runs the real jitted, data-parallel step (``make_train_step`` over all devices, the recipe's
SGD and poly schedule) on randomly initialised variables and a random batch of
``per_device_batch * device_count`` images. ``--per_device_batch`` defaults to each recipe's
per-device batch, ``train.batch_size // train.num_replicas`` (the reference's batch per GPU),
and each device then holds one of the reference's replicas (``num_replicas = device_count``:
per-replica losses and memory updates, as on the reference's GPUs). Throughput counts images
per second over ``--iters`` steps after one warm-up step; compile time is the step's lower +
compile. Peak memory is ``peak_bytes_in_use`` of device 0 after the run; where the backend
keeps no device statistics (CPU) it is the growth of the process's peak resident set size
(``ru_maxrss``) during that run, printed as ``host peak RSS +...`` (0 when an earlier run of
the same process peaked higher). Prints one line per config and dtype (``--dtypes``, default
``float32,bfloat16``; ``--dtype`` is an alias).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import xla_stats
from benchmark_args import add_common_arguments
from jax.sharding import Mesh

import mcibi_jax
from mcibi_jax.config import model_dtype
from mcibi_jax.models.segmentor import MCIBI, build_model
from mcibi_jax.sharding import data_mesh, global_batch, replicated_sharding
from mcibi_jax.train.optimizer import optimizer_from_config
from mcibi_jax.train.state import create_train_state, init_variables
from mcibi_jax.train.step import make_train_step


def peak_memory(device: jax.Device) -> int | None:
    """``peak_bytes_in_use`` of ``device``, or None where the backend keeps no statistics."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def host_peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss``: KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def recipe_per_device_batch(train_config: dict) -> int:
    """The reference's images per GPU: ``train.batch_size // train.num_replicas`` (at least 1)."""
    replicas = max(1, int(train_config.get("num_replicas", 1)))
    return max(1, int(train_config["batch_size"]) // replicas)


def format_memory(result: dict) -> str:
    """``peak memory 1.23 GiB`` (device statistics) or ``host peak RSS +0.45 GiB`` (CPU)."""
    if result["peak_bytes"] is not None:
        return f"peak memory {result['peak_bytes'] / 2**30:.2f} GiB"
    return f"host peak RSS +{result['host_rss_growth_bytes'] / 2**30:.2f} GiB"


class TrainCase(NamedTuple):
    """A recipe's jitted, data-parallel train step and the shapes it runs on (:func:`train_case`)."""

    spec: str
    dtype_name: str
    config: ml_collections.ConfigDict
    model: MCIBI
    mesh: Mesh
    tx: optax.GradientTransformation
    step: Callable  # jitted (state, batch, dropout_key) -> (state, metrics)
    per_device_batch: int
    batch_size: int
    num_replicas: int
    size: tuple[int, int]
    make_step: Callable[..., Callable]  # a new jitted step, traced afresh

    def model_flops(self) -> float:
        """FLOPs of one step in the model's own formulation (``xla_stats.model_formulation``)
        and without rematerialisation: the numerator of MFU, whichever paths the compiled step
        takes and whatever it recomputes."""
        with xla_stats.model_formulation():
            traced = self.make_step(remat=False).trace(*self.abstract_inputs())
        return xla_stats.jaxpr_flops(traced.jaxpr)

    def abstract_inputs(self, seed: int = 0) -> tuple[Any, dict, Any]:
        """(state, batch, dropout key) as shapes only: enough to lower and compile the step."""
        variables = jax.eval_shape(
            lambda: init_variables(self.model, jax.random.key(seed, impl="rbg"), self.size)
        )
        state = jax.eval_shape(lambda v: create_train_state(v, self.tx), variables)
        height, width = self.size
        batch = {
            "images": jax.ShapeDtypeStruct((self.batch_size, height, width, 3), jnp.float32),
            "labels": jax.ShapeDtypeStruct((self.batch_size, height, width), jnp.int32),
        }
        return state, batch, jax.eval_shape(lambda: jax.random.key(seed + 1))

    def initial_state(self, seed: int = 0, variables: Any = None) -> Any:
        """Randomly initialised (or the given) variables and optimizer state, replicated over the mesh."""
        if variables is None:
            variables = init_variables(self.model, jax.random.key(seed, impl="rbg"), self.size)
        state = jax.device_put(
            create_train_state(variables, self.tx), replicated_sharding(self.mesh)
        )
        return jax.block_until_ready(state)

    def random_batch(self, seed: int = 0) -> dict:
        """A batch of normal images and uniform labels, split over the mesh."""
        rng = np.random.default_rng(seed)
        height, width = self.size
        return global_batch(
            {
                "images": rng.standard_normal(
                    (self.batch_size, height, width, 3), dtype=np.float32
                ),
                "labels": rng.integers(
                    0,
                    int(self.config.dataset.num_classes),
                    (self.batch_size, height, width),
                    dtype=np.int32,
                ),
            },
            self.mesh,
        )

    def dropout_key(self, seed: int = 0) -> jax.Array:
        return jax.device_put(jax.random.key(seed + 1), replicated_sharding(self.mesh))


def train_case(
    spec: str,
    per_device_batch: int | None,
    size: tuple[int, int] | None,
    dtype_name: str,
    steps_per_epoch: int,
    overrides: Sequence[str] = (),
    mesh: Mesh | None = None,
) -> TrainCase:
    """The jitted train step of the recipe ``spec`` (plus ``overrides``, e.g.
    ``model.backbone.remat=True``, ``model.head.remat=True``) over all devices (or ``mesh``'s),
    in ``dtype_name``.

    ``per_device_batch`` None: the recipe's (:func:`recipe_per_device_batch`). ``size`` (H, W)
    None: the recipe's training crop. Nothing is allocated or compiled yet.
    """
    config = mcibi_jax.load_config(spec, overrides)
    height, width = size or tuple(config.dataset.train.crop_size)
    mesh = mesh or data_mesh()
    train_config = config.train.to_dict()
    per_device_batch = per_device_batch or recipe_per_device_batch(train_config)
    batch_size = per_device_batch * mesh.size
    # one reference replica (its per-GPU losses and memory update) per device
    num_replicas = mesh.size if batch_size % mesh.size == 0 else 1
    model = build_model(config.model, dtype=model_dtype(dtype_name))
    params = jax.eval_shape(
        lambda: init_variables(model, jax.random.key(0, impl="rbg"), (height, width))
    )["params"]
    tx, schedule = optimizer_from_config(params, train_config, steps_per_epoch)

    def make_step(remat: bool = True) -> Callable:
        """A new jitted step; ``remat=False``: of the same model without rematerialisation."""
        step_model, model_config = model, config.model
        if not remat and (
            config.model.backbone.get("remat", False) or config.model.head.get("remat", False)
        ):
            model_config = ml_collections.ConfigDict(config.model.to_dict())
            model_config.backbone.remat = False
            model_config.head.remat = False
            step_model = build_model(model_config, dtype=model_dtype(dtype_name))
        return make_train_step(
            step_model,
            model_config.to_dict(),
            tx,
            schedule,
            steps_per_epoch,
            mesh,
            int(config.dataset.get("ignore_label", -100)),
            num_replicas,
        )

    return TrainCase(
        spec,
        dtype_name,
        config,
        model,
        mesh,
        tx,
        make_step(),
        per_device_batch,
        batch_size,
        num_replicas,
        (height, width),
        make_step,
    )


def benchmark(
    spec: str,
    iters: int,
    per_device_batch: int | None,
    size: tuple[int, int] | None,
    dtype_name: str,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> dict:
    """Times ``iters`` training steps of the recipe ``spec`` in ``dtype_name``; returns the figures as a dict.

    ``per_device_batch`` None: the recipe's (:func:`recipe_per_device_batch`). ``size`` (H, W)
    None: the recipe's training crop. ``overrides``: config overrides, ``"key=value"``.
    """
    rss_before = host_peak_rss()
    case = train_case(
        spec, per_device_batch, size, dtype_name, max(1, iters + 1), overrides=overrides
    )

    started = time.perf_counter()
    state = case.initial_state(seed)
    init_s = time.perf_counter() - started
    batch, dropout_key = case.random_batch(seed), case.dropout_key(seed)

    started = time.perf_counter()
    compiled = case.step.lower(state, batch, dropout_key).compile()
    compile_s = time.perf_counter() - started
    state, metrics = compiled(state, batch, dropout_key)  # warm-up
    jax.block_until_ready(metrics["loss"])
    started = time.perf_counter()
    for _ in range(iters):
        state, metrics = compiled(state, batch, dropout_key)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - started
    return {
        "config": spec,
        "dtype": dtype_name,
        "per_device_batch": case.per_device_batch,
        "batch": case.batch_size,
        "num_replicas": case.num_replicas,
        "size": case.size,
        "init_s": init_s,
        "compile_s": compile_s,
        "step_s": elapsed / iters,
        "images_per_s": case.batch_size * iters / elapsed,
        "loss": float(metrics["loss"]),
        "peak_bytes": peak_memory(case.mesh.devices.flat[0]),
        "host_rss_growth_bytes": max(0, host_peak_rss() - rss_before),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--iters", type=int, default=10, help="timed steps (after one warm-up step)"
    )
    parser.add_argument(
        "--per_device_batch",
        type=int,
        default=None,
        help="images per device and step (default: each recipe's batch_size // num_replicas)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every config, e.g. model.backbone.scan_blocks=True (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.iters < 1 or (args.per_device_batch is not None and args.per_device_batch < 1):
        parser.error("--iters and --per_device_batch must be at least 1")
    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()})", flush=True
    )
    for spec in args.configs.split(","):
        for dtype_name in args.dtypes:
            try:
                r = benchmark(
                    spec.strip(),
                    args.iters,
                    args.per_device_batch,
                    args.size,
                    dtype_name,
                    overrides=args.overrides,
                )
            except mcibi_jax.ConfigError as error:
                parser.error(str(error))
            size = f"{r['batch']}x{r['size'][0]}x{r['size'][1]}"
            print(
                f"{r['config']:<28} {r['dtype']:<8} {r['per_device_batch']:>3}/device {size:>14}  "
                f"compile {r['compile_s']:7.1f} s  step {r['step_s'] * 1000:9.1f} ms  "
                f"{r['images_per_s']:8.2f} images/s  {format_memory(r)}  "
                f"(init {r['init_s']:.1f} s, loss {r['loss']:.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
