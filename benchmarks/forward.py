"""Jitted forward throughput and compile time of the released models.

    python benchmarks/forward.py                       # every backbone, its recipe's crop, batch 1, float32 and bfloat16
    python benchmarks/forward.py --configs=configs/cityscapes.py:r50 --size=128x128 --iters=2
    python benchmarks/forward.py --configs=configs/ade20k.py:vitl --iters=20 --dtypes=float32

Weights are random (throughput does not depend on them). Prints the device JAX sees, then one
line per config and dtype (``--dtypes``, default ``float32,bfloat16``; ``--dtype`` is an alias).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from benchmark_args import add_common_arguments

import mcibi_jax
from mcibi_jax.config import model_dtype
from mcibi_jax.models.segmentor import build_model


def forward_case(
    spec: str, batch: int, size: tuple[int, int] | None, dtype_name: str
) -> tuple[Callable, Any, jax.Array]:
    """(jitted eval-mode forward to the final logits, random variables, (batch, H, W, 3) zeros) of
    ``spec``'s model in ``dtype_name``; ``size`` (H, W) None: the recipe's training crop."""
    config = mcibi_jax.load_config(spec)
    height, width = size or tuple(config.dataset.train.crop_size)
    model = build_model(config.model, dtype=model_dtype(dtype_name))
    images = jnp.zeros((batch, height, width, 3), jnp.float32)
    # rbg keys: the initialisation compiles about 3x faster than with threefry keys
    variables = jax.jit(lambda key: model.init(key, images, train=False))(
        jax.random.key(0, impl="rbg")
    )
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)["stage2"])
    return forward, variables, images


def benchmark(
    spec: str, iters: int, batch: int, size: tuple[int, int] | None, dtype_name: str
) -> dict:
    """Times ``iters`` jitted eval-mode forwards of ``spec``'s model on (batch, H, W, 3) zeros."""
    forward, variables, images = forward_case(spec, batch, size, dtype_name)
    _, height, width, _ = images.shape
    start = time.perf_counter()
    compiled = forward.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    compiled(variables, images).block_until_ready()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        out = compiled(variables, images)
    out.block_until_ready()
    elapsed = time.perf_counter() - start
    return {
        "config": spec,
        "dtype": dtype_name,
        "size": f"{batch}x{height}x{width}",
        "compile_s": compile_s,
        "images_per_s": batch * iters / elapsed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    size = args.size
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})",
        flush=True,
    )
    for spec in args.configs.split(","):
        for dtype_name in args.dtypes:
            try:
                r = benchmark(spec.strip(), args.iters, args.batch, size, dtype_name)
            except mcibi_jax.ConfigError as error:
                parser.error(str(error))
            print(
                f"{r['config']:<32} {r['dtype']:<8} {r['size']:>14}  compile {r['compile_s']:7.1f} s  "
                f"{r['images_per_s']:8.2f} images/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
