"""Jitted forward throughput and compile time of the released models.

    python benchmarks/forward.py                       # every backbone, its recipe's crop, batch 1
    python benchmarks/forward.py --configs=configs/ade20k.py:vitl --iters=20 --dtype=float32

Weights are random (throughput does not depend on them). Prints one line per config with the
device JAX sees.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import mcibi_jax
from mcibi_jax.models.segmentor import build_model

DEFAULT_CONFIGS = [
    "configs/cityscapes.py:r50",
    "configs/cityscapes.py:r101",
    "configs/cityscapes.py:s101",
    "configs/cityscapes.py:hrnet48",
    "configs/ade20k.py:vitl",
]


def benchmark(spec: str, iters: int, batch: int, size: tuple[int, int] | None, dtype) -> dict:
    config = mcibi_jax.load_config(spec)
    height, width = size or tuple(config.dataset.train.crop_size)
    model = build_model(config.model, dtype=dtype)
    images = jnp.zeros((batch, height, width, 3), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)["stage2"])
    start = time.perf_counter()
    compiled = forward.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    compiled(variables, images).block_until_ready()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        out = compiled(variables, images)
    out.block_until_ready()
    elapsed = time.perf_counter() - start
    return {"config": spec, "size": f"{batch}x{height}x{width}", "compile_s": compile_s, "images_per_s": batch * iters / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated config specs")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", default=None, help="HxW instead of the recipe's crop size, e.g. 256x512")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    size = tuple(int(s) for s in args.size.split("x")) if args.size else None
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), dtype {args.dtype}")
    for spec in args.configs.split(","):
        r = benchmark(spec, args.iters, args.batch, size, dtype)
        print(f"{r['config']:<32} {r['size']:>14}  compile {r['compile_s']:7.1f} s  {r['images_per_s']:8.2f} images/s", flush=True)


if __name__ == "__main__":
    main()
