"""Training-step throughput, compile time and peak device memory of the released recipes.

    python benchmarks/train_step.py                      # every backbone, its recipe's crop, 2 images per device
    python benchmarks/train_step.py --configs=configs/cityscapes.py:r50 --size=128x128 --iters=2
    python benchmarks/train_step.py --per_device_batch=4 --dtype=bfloat16

Runs the real jitted, data-parallel step (``make_train_step`` over all devices, the recipe's
SGD and poly schedule) on randomly initialised variables and a random batch of
``per_device_batch * device_count`` images. Throughput counts images per second over
``--iters`` steps after one warm-up step; compile time is the step's lower + compile. Peak
memory is ``peak_bytes_in_use`` of device 0 after the run (``n/a`` where the backend does not
report it, e.g. CPU). Prints one line per config.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import mcibi_jax
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.train.optimizer import optimizer_from_config
from mcibi_jax.train.state import create_train_state, init_variables
from mcibi_jax.train.step import data_mesh, make_train_step, replicated, shard_batch

DEFAULT_CONFIGS = [
    "configs/cityscapes.py:r50",
    "configs/cityscapes.py:r101",
    "configs/cityscapes.py:s101",
    "configs/cityscapes.py:hrnet48",
    "configs/ade20k.py:vitl",
]
_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def peak_memory(device: jax.Device) -> int | None:
    """``peak_bytes_in_use`` of ``device``, or None where the backend keeps no statistics."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def _format_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def benchmark(spec: str, iters: int, per_device_batch: int, size: tuple[int, int] | None, dtype_name: str | None,
              seed: int = 0) -> dict:
    """Times ``iters`` training steps of the recipe ``spec``; returns the figures as a dict."""
    config = mcibi_jax.load_config(spec)
    dtype_name = dtype_name or config.get("dtype", "float32")
    height, width = size or tuple(config.dataset.train.crop_size)
    mesh = data_mesh()
    batch_size = per_device_batch * mesh.size
    train_config = config.train.to_dict()
    num_replicas = int(train_config.get("num_replicas", 1))
    if batch_size % num_replicas:
        num_replicas = 1
    model = build_model(config.model, dtype=_DTYPES[dtype_name])
    steps_per_epoch = max(1, iters + 1)

    started = time.perf_counter()
    variables = init_variables(model, jax.random.key(seed, impl="rbg"), (height, width))
    tx, schedule = optimizer_from_config(variables["params"], train_config, steps_per_epoch)
    state = jax.device_put(create_train_state(variables, tx), replicated(mesh))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - started
    del variables

    rng = np.random.default_rng(seed)
    batch = shard_batch({
        "images": rng.standard_normal((batch_size, height, width, 3), dtype=np.float32),
        "labels": rng.integers(0, int(config.dataset.num_classes), (batch_size, height, width), dtype=np.int32),
    }, mesh)
    dropout_key = jax.device_put(jax.random.key(seed + 1), replicated(mesh))
    step = make_train_step(model, config.model.to_dict(), tx, schedule, steps_per_epoch, mesh,
                           int(config.dataset.get("ignore_label", -100)), num_replicas)

    started = time.perf_counter()
    compiled = step.lower(state, batch, dropout_key).compile()
    compile_s = time.perf_counter() - started
    state, metrics = compiled(state, batch, dropout_key)  # warm-up
    jax.block_until_ready(metrics["loss"])
    started = time.perf_counter()
    for _ in range(iters):
        state, metrics = compiled(state, batch, dropout_key)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - started
    return {
        "config": spec, "dtype": dtype_name, "batch": batch_size, "size": (height, width), "init_s": init_s,
        "compile_s": compile_s, "step_s": elapsed / iters, "images_per_s": batch_size * iters / elapsed,
        "loss": float(metrics["loss"]), "peak_bytes": peak_memory(mesh.devices.flat[0]),
    }


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 512x1024, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return height, width


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated config specs")
    parser.add_argument("--iters", type=int, default=10, help="timed steps (after one warm-up step)")
    parser.add_argument("--per_device_batch", type=int, default=2, help="images per device and step")
    parser.add_argument("--size", type=_size, default=None, help="HxW instead of the recipe's crop size, e.g. 256x512")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: the recipe's dtype")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.per_device_batch < 1:
        parser.error("--iters and --per_device_batch must be at least 1")
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"{args.per_device_batch} image(s) per device", flush=True)
    for spec in args.configs.split(","):
        r = benchmark(spec.strip(), args.iters, args.per_device_batch, args.size, args.dtype)
        size = f"{r['batch']}x{r['size'][0]}x{r['size'][1]}"
        print(f"{r['config']:<28} {r['dtype']:<8} {size:>14}  compile {r['compile_s']:7.1f} s  "
              f"step {r['step_s'] * 1000:9.1f} ms  {r['images_per_s']:8.2f} images/s  "
              f"peak memory {_format_bytes(r['peak_bytes'])}  (init {r['init_s']:.1f} s, loss {r['loss']:.3f})", flush=True)


if __name__ == "__main__":
    main()
