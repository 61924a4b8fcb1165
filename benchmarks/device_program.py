"""What XLA makes of a recipe's programs for a GPU or a TPU, compiled without one.

    python -m venv /tmp/gpu && /tmp/gpu/bin/pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')" -e .
    /tmp/gpu/bin/python benchmarks/device_program.py --configs=configs/cityscapes.py:r50 --out_dir=/tmp/gpu_hlo
    # TPUs: a venv with "jax[tpu]==<the same version>" -e ., then --target=tpu-v5e (or tpu-v6e, tpu-v5p, tpu-v4)

JAX compiles for a described device without one (``jax.experimental.topologies``: for GPUs the
CUDA plugin with an XLA ``GpuTargetConfig``, for TPUs libtpu with a topology name). Nothing is
autotuned or timed, but the optimised program shows what the compiler made of each part of the
model, and whether it compiles at all (session 18 found a bfloat16 train step that XLA:TPU
could not compile). Per config and dtype this prints:

* for an H100 (``--target=h100``, the default), the cuDNN convs by kind and window, flagging
  forward convs whose window is larger than their output, over an input of a few channels: a
  kernel gradient that XLA:GPU did not map to cuDNN's backward-filter conv (the whole output
  gradient as the kernel, the batch as input channels; session 18 found 11 in R-50's train
  step, see docs/benchmarks.md);
* for a TPU, XLA:TPU's cost-model estimate of each op's cycles (``estimated_cycles``), summed
  per JAX scope: a profile by the compiler's model, not a measurement;
* scatters and select-and-scatters (atomics on a GPU, serial work on a TPU) and while loops,
  with their JAX scopes;
* for an H100, a roofline of the program (``hlo_roofline.py``): each kernel at the longer of
  its arithmetic at peak rate and its memory traffic at full bandwidth, summed, per JAX scope,
  the longest kernels, and the MFU that bound allows (and the same program's bound at an
  H200's bandwidth);
* XLA's memory plan of the program (its buffer assignment: peak, arguments, outputs, scratch;
  on a GPU without cuDNN's workspaces, which autotuning picks).

It writes each optimised HLO to ``--out_dir``. The model is traced with
``jax.default_backend()`` reporting the target's platform, since the package picks its
accelerator paths by it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import hlo_roofline  # noqa: E402
import jax  # noqa: E402
import xla_stats  # noqa: E402
from benchmark_args import add_common_arguments  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from train_step import train_case  # noqa: E402

# An H100 SXM as XLA describes a GPU (stream_executor's DeviceDescription); cuDNN 9 and CUDA 12
# as in the jax[cuda12] wheels.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 0 }
runtime_version { major: 12 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# Deviceless TPU topologies (libtpu's names); a program for one device takes the first chip.
TPU_TOPOLOGIES = {
    "tpu-v5e": "v5e:1x1",
    "tpu-v6e": "v6e:1x1",
    "tpu-v5p": "v5p:2x2x1",
    "tpu-v4": "v4:2x2x1",
}
TARGETS = ("h100", *TPU_TOPOLOGIES)

CUDNN_CONV = re.compile(r'custom_call_target="__cudnn\$(conv\w*)"')
WINDOW = re.compile(r"window=\{([^}]*)\}")
SHAPE = re.compile(r"=\s*\(?(\w+)\[([\d,]*)\]")
OP_NAME = hlo_roofline.OP_NAME
FLAGGED_OPS = re.compile(r"\s(scatter|select-and-scatter|while)\(")
ESTIMATED_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
CONDITION = re.compile(r"condition=%([\w.-]+)")
LOOP_BOUND = re.compile(r"s32\[\]\S* constant\((\d+)\)")
DEFINITION = re.compile(r"%([\w.-]+) = \(?\w+\[([\d,]*)\]")
OPERAND = re.compile(r"custom-call\(%([\w.-]+)")
# A forward conv whose window is wider than its output and whose input has fewer channels than
# this is a kernel gradient contracting over the batch: cuDNN's backward-filter conv missed.
MIN_INPUT_FEATURES = 16


def prepare_environment(target: str) -> None:
    """Before any backend starts. For the H100: the CUDA plugin's start-up check calls cuInit,
    which fails without a driver unless skipped. For TPUs: libtpu must not ask a cloud metadata
    server for its machine. The default backend stays the CPU."""
    if target == "h100":
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
        # On an H100, MCIBI_ATTENTION's default takes cuDNN's attention once its check has run
        # there; the check needs the device, so name cuDNN here (xla: XLA's attention instead).
        os.environ.setdefault("MCIBI_ATTENTION", "cudnn")
        # Without autotuning, deviceless compiles stop at some float32 matmul fusions ("Couldn't
        # find output tile sizes"); cuBLAS takes those matmuls instead. Convs are unaffected.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false"
        ).strip()
    else:
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    jax.config.update("jax_platforms", "cpu")


def h100_mesh() -> Mesh:
    """A one-device mesh of a described H100 (no device needed); its axis is 'data'."""
    from jax._src import xla_bridge
    from jax.experimental import topologies

    xla_bridge._discover_and_register_pjrt_plugins()
    if "cuda" not in xla_bridge._topology_factories:
        raise SystemExit(
            "error: no CUDA plugin for JAX here; install it beside this JAX, e.g. "
            f'pip install "jax[cuda12]=={jax.__version__}" (no GPU is needed)'
        )
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1"
    )
    devices = topologies.make_mesh(topology, (1,), ("data",)).devices
    return Mesh(devices, ("data",))


def tpu_mesh(target: str) -> Mesh:
    """A one-device mesh of a described TPU chip (no TPU needed); its axis is 'data'."""
    import numpy as np
    from jax.experimental import topologies

    name = TPU_TOPOLOGIES[target]
    bounds = {"chips_per_host_bounds": (1, 1, 1)} if name.endswith(":1x1") else {}
    try:
        topology = topologies.get_topology_desc(topology_name=name, platform="tpu", **bounds)
    except Exception as error:  # no libtpu: the message varies with the JAX version
        raise SystemExit(
            f"error: cannot describe a {target} ({error}); install libtpu beside this JAX, e.g. "
            f'pip install "jax[tpu]=={jax.__version__}" (no TPU is needed)'
        ) from None
    return Mesh(np.asarray(topology.devices)[:1], ("data",))


def describe_h100_to_cudnn_attention() -> None:
    """JAX's cuDNN attention asks the live GPU backend for the compute capability (Hopper:
    head dims up to 256); compiled without one, it is told: 9.0."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    cudnn_attention.check_compute_capability = lambda capability: (
        (9, 0) >= tuple(int(part) for part in capability.split("."))
    )
    cudnn_attention.is_cuda_compute_capability_equal = lambda capability: capability == "9.0"


def device_mesh(target: str) -> Mesh:
    return h100_mesh() if target == "h100" else tpu_mesh(target)


def _window_sizes(window: str) -> list[int]:
    match = re.search(r"size=([\dx]+)", window)
    return [int(s) for s in match.group(1).split("x")] if match else []


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def summarize(hlo: str) -> dict:
    """cuDNN convs by (kind, window) with counts; flagged convs and ops with their JAX scopes."""
    shapes = {m.group(1): _dims(m.group(2)) for m in DEFINITION.finditer(hlo)}
    convs: collections.Counter = collections.Counter()
    wide_kernels, flagged = [], collections.Counter()
    for line in hlo.splitlines():
        conv = CUDNN_CONV.search(line)
        if conv:
            window = WINDOW.search(line).group(1) if WINDOW.search(line) else ""
            convs[(conv.group(1), window)] += 1
            output = SHAPE.search(line)
            out = _dims(output.group(2))[1:-1] if output else []  # b01f
            lhs = shapes.get(OPERAND.search(line).group(1), [0]) if OPERAND.search(line) else [0]
            if (
                conv.group(1).startswith(("convForward", "convBiasActivationForward"))
                and any(k > o for k, o in zip(_window_sizes(window), out))
                and lhs[-1] < MIN_INPUT_FEATURES
            ):
                name = OP_NAME.search(line)
                wide_kernels.append(f"{window}  {name.group(1) if name else ''}")
            continue
        op = FLAGGED_OPS.search(line)
        if op:
            name = OP_NAME.search(line)
            flagged[(op.group(1), name.group(1) if name else "")] += 1
    return {"convs": convs, "wide_kernels": wide_kernels, "flagged": flagged}


def cycles_by_scope(hlo: str, depth: int = 4) -> tuple[int, collections.Counter]:
    """XLA:TPU's estimated cycles of the program's ops: the total and the sums per JAX scope
    (the op's name stack cut to ``depth`` parts after the jitted function's name). A while
    loop's body counts once per trip (the bound its condition compares the counter with:
    XLA:TPU's programs carry no trip counts of their own, e.g. the losses' bands)."""
    by_scope: collections.Counter = collections.Counter()

    def add(line: str, repeats: int) -> None:
        cycles = ESTIMATED_CYCLES.search(line)
        if cycles:
            name = OP_NAME.search(line)
            parts = (name.group(1) if name else "(unnamed)").split("/")[1 : 1 + depth]
            by_scope["/".join(parts) or "(unnamed)"] += repeats * int(cycles.group(1))

    computations = hlo_roofline.parse(hlo)
    if "ENTRY" not in computations:  # a fragment: its lines as they are
        for line in hlo.splitlines():
            add(line, 1)
        return sum(by_scope.values()), by_scope

    def visit(body: list, repeats: int) -> None:
        for instruction in body:
            add(instruction.line, repeats)
            if instruction.opcode == "while":
                condition = computations.get(instruction.attribute(CONDITION) or "", [])
                bounds = [int(b) for i in condition for b in LOOP_BOUND.findall(i.line)]
                visit(
                    computations.get(instruction.attribute(hlo_roofline.BODY) or "", []),
                    repeats * (max(bounds) if bounds else 1),
                )

    visit(computations["ENTRY"], 1)
    return sum(by_scope.values()), by_scope


def build(spec: str, dtype_name: str, size, overrides, work: str, mesh: Mesh, batch_size: int = 0):
    """(jitted program, abstract arguments placed on ``mesh``, its FLOPs as the accelerator
    benchmark's MFU counts them) of a recipe's train step or eval forward, at the recipe's
    per-device batch (or ``batch_size``)."""
    case = train_case(spec, batch_size or None, size, dtype_name, 100, overrides, mesh=mesh)
    state, batch, key = case.abstract_inputs()
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))

    def placed(tree, sharding):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree
        )

    if work == "forward":
        model = case.model
        program = jax.jit(lambda v, x: model.apply(v, x, train=False)["stage2"])
        arguments = (placed(state.variables, replicated), placed(batch["images"], split))
        return program, arguments, xla_stats.model_flops(program, *arguments)
    arguments = (placed(state, replicated), placed(batch, split), placed(key, replicated))
    return case.step, arguments, case.model_flops()


def memory_plan(compiled) -> str:
    """XLA's buffer assignment of a compiled program, in GiB (on a GPU without cuDNN's
    workspaces, which autotuning picks)."""
    stats = compiled.memory_analysis()
    gib = 2.0**30
    return (
        f"XLA's memory plan: peak {stats.peak_memory_in_bytes / gib:.2f} GiB (arguments "
        f"{stats.argument_size_in_bytes / gib:.2f}, outputs {stats.output_size_in_bytes / gib:.2f}"
        f" of which {stats.alias_size_in_bytes / gib:.2f} reuse the arguments' buffers, scratch "
        f"{stats.temp_size_in_bytes / gib:.2f})"
    )


def tpu_report(hlo: str, top: int = 20) -> str:
    total, by_scope = cycles_by_scope(hlo)
    lines = [f"XLA:TPU's cost model: {total:,} estimated cycles; the largest scopes:"]
    for scope, cycles in by_scope.most_common(top):
        lines.append(f"  {100 * cycles / max(total, 1):5.1f} %  {cycles:>13,}  {scope}")
    return "\n".join(lines)


def report(name: str, hlo: str, seconds: float, target: str = "h100") -> str:
    """What the optimised program ``hlo`` shows for ``target`` (see the module's docstring)."""
    summary = summarize(hlo)
    lines = [f"== {name}: compiled for {target} in {seconds:.1f} s"]
    if target == "h100":
        lines.append("cuDNN convs:")
        for (kind, window), count in sorted(summary["convs"].items()):
            lines.append(f"  {count:4d}  {kind:28s} {window}")
        wide = summary["wide_kernels"]
        lines.append(
            "forward convs with a window larger than their output over a few input channels "
            f"(missed backward-filter convs): {len(wide)}"
        )
        lines += [f"  {w}" for w in wide]
    else:
        lines.append(tpu_report(hlo))
    lines.append("scatters, select-and-scatters, while loops:")
    for (op, scope), count in sorted(summary["flagged"].items()):
        lines.append(f"  {count:4d}  {op:18s} {scope}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.set_defaults(dtypes="bfloat16")
    parser.add_argument(
        "--work", default="train", help="comma-separated: train (the train step), forward"
    )
    parser.add_argument(
        "--target", default="h100", choices=TARGETS, help="the device to compile for"
    )
    parser.add_argument("--out_dir", default=None, help="writes each optimised HLO here")
    parser.add_argument(
        "--per_device_batch",
        type=int,
        default=0,
        help="images per device instead of the recipe's (train.batch_size / train.num_replicas)",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="config override KEY=VALUE (repeatable)"
    )
    args = parser.parse_args(argv)
    dtypes = args.dtypes if isinstance(args.dtypes, list) else args.dtypes.split(",")
    works = [w.strip() for w in args.work.split(",") if w.strip()]
    if not set(works) <= {"train", "forward"}:
        parser.error(f"--work: expected train and/or forward, got {args.work!r}")
    prepare_environment(args.target)
    mesh = device_mesh(args.target)
    # The package picks its accelerator paths (e.g. the dilated convs' kernel gradient) by backend.
    platform = "gpu" if args.target == "h100" else "tpu"
    jax.default_backend = lambda: platform
    if args.target == "h100":
        describe_h100_to_cudnn_attention()
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for spec in [s.strip() for s in args.configs.split(",") if s.strip()]:
        for dtype_name in dtypes:
            for work in works:
                name = f"{spec} {dtype_name} {work}"
                program, arguments, flops = build(
                    spec, dtype_name, args.size, args.set, work, mesh, args.per_device_batch
                )
                start = time.perf_counter()
                compiled = program.lower(*arguments).compile()
                seconds = time.perf_counter() - start
                hlo = compiled.as_text()
                print(report(name, hlo, seconds, args.target), flush=True)
                if args.target == "h100":
                    print(hlo_roofline.report(hlo, flops), flush=True)
                    # the same program against an H200's bandwidth (XLA tunes it alike)
                    h200 = hlo_roofline.report(
                        hlo, flops, hlo_roofline.H200, 0, 0, device_name="H200 SXM"
                    )
                    print(h200, flush=True)
                print(memory_plan(compiled), flush=True)
                if out_dir:
                    stem = re.sub(r"[^\w.-]+", "_", name)
                    (out_dir / f"{stem}.hlo.txt").write_text(hlo)


if __name__ == "__main__":
    main()
