"""XLA's memory plan of a train step with and without rematerialisation (``model.backbone.remat``
and ``model.head.remat``), at the recipe's per-device batch and at a multiple of it, compiled
for the local device without running it.

    python benchmarks/remat_memory.py                                   # ViT-L (ADE20k), HRNet-W48 (Cityscapes)
    python benchmarks/remat_memory.py --configs=configs/cityscapes.py:r50 --factors=1 --dtypes=bfloat16

The step is lowered with abstract inputs (shapes only: no weights are initialised) and compiled;
``memory_analysis()`` of the compiled program gives its arguments (state and batch), outputs,
and scratch ("temp": activations kept for the backward pass, gradients, workspace), whose sum
is what the step needs on one device. The plan is the compiling backend's: on a CPU it shows
what rematerialisation saves, not an accelerator's exact figure. XLA:CPU normally expands the
optimization barriers that keep a rematerialised block from being merged back into the forward
pass (its ``cse_barrier_expander`` pass; accelerator compilers keep them), which would make
remat a no-op there; where no accelerator plugin is installed (or ``JAX_PLATFORMS=cpu``) this
script disables that pass, so that the CPU plan shows what an accelerator's would. Prints one
markdown table row per config, dtype, batch and remat setting; ``--out`` also writes the table
to a file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmark_args import add_common_arguments, remat_overrides  # noqa: E402

DEFAULT_CONFIGS = "configs/ade20k.py:vitl,configs/cityscapes.py:hrnet48"
KEEP_REMAT_ON_CPU = "--xla_disable_hlo_passes=cse_barrier_expander"
ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "libtpu",
)


def keep_remat_on_cpu() -> bool:
    """Adds :data:`KEEP_REMAT_ON_CPU` to XLA_FLAGS (before JAX starts its backend) when JAX will
    compile for the CPU; returns whether it did."""
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "")
    on_cpu = platforms == "cpu" or (
        not platforms and not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)
    )
    if on_cpu and KEEP_REMAT_ON_CPU not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {KEEP_REMAT_ON_CPU}".strip()
    return on_cpu


HEADER = (
    "| config | dtype | per-device batch | remat | temp GiB | arguments GiB | outputs GiB | total GiB | "
    "TFLOP/step | compile s |\n|---|---|---|---|---|---|---|---|---|---|"
)


def measure(
    spec: str,
    dtype_name: str,
    per_device_batch: int | None,
    size: tuple[int, int] | None,
    remat: bool,
) -> dict:
    """The compiled train step's memory plan (bytes), FLOPs and compile time."""
    import xla_stats
    from train_step import train_case

    case = train_case(
        spec,
        per_device_batch,
        size,
        dtype_name,
        steps_per_epoch=10_000,
        overrides=remat_overrides(remat),
    )
    started = time.perf_counter()
    traced = case.step.trace(*case.abstract_inputs())
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - started
    plan = xla_stats.compiled_memory(compiled) or {}
    total = (
        plan.get("argument", 0) + plan.get("output", 0) + plan.get("temp", 0) - plan.get("alias", 0)
    )
    return {
        "config": spec,
        "dtype": dtype_name,
        "per_device_batch": case.per_device_batch,
        "size": case.size,
        "remat": remat,
        **{f"{k}_bytes": v for k, v in plan.items()},
        "total_bytes": total,
        # the jaxpr's count: XLA's analysis counts a loop's body once (chunked attention)
        "flops": xla_stats.jaxpr_flops(traced.jaxpr),
        "compile_s": compile_s,
    }


def format_row(r: dict) -> str:
    gib = lambda key: f"{r.get(key, 0) / 2**30:.2f}"  # noqa: E731
    flops = f"{r['flops'] / 1e12:.2f}" if r.get("flops") else ""
    return (
        f"| {r['config']} | {r['dtype']} | {r['per_device_batch']} x {r['size'][0]}x{r['size'][1]} | "
        f"{'on' if r['remat'] else 'off'} | {gib('temp_bytes')} | {gib('argument_bytes')} | "
        f"{gib('output_bytes')} | {gib('total_bytes')} | {flops} | {r['compile_s']:.0f} |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.set_defaults(configs=DEFAULT_CONFIGS, dtypes=["float32"])
    parser.add_argument(
        "--factors", default="1,2", help="multiples of the recipe's per-device batch"
    )
    parser.add_argument(
        "--per_device_batch",
        type=int,
        default=None,
        help="instead of each recipe's batch_size // num_replicas",
    )
    parser.add_argument(
        "--remat", default="off,on", help="remat settings to compile: off, on or off,on"
    )
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    kept = keep_remat_on_cpu()
    import jax
    from train_step import recipe_per_device_batch

    import mcibi_jax

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
        + (f", XLA_FLAGS {KEEP_REMAT_ON_CPU}" if kept else ""),
        flush=True,
    )
    lines, rows = [HEADER], []
    print(HEADER, flush=True)
    for spec in (s.strip() for s in args.configs.split(",") if s.strip()):
        base = args.per_device_batch or recipe_per_device_batch(
            mcibi_jax.load_config(spec).train.to_dict()
        )
        for dtype_name in args.dtypes:
            for factor in (int(f) for f in args.factors.split(",")):
                for remat in (setting.strip() == "on" for setting in args.remat.split(",")):
                    row = measure(spec, dtype_name, base * factor, args.size, remat)
                    rows.append(row)
                    lines.append(format_row(row))
                    print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
