"""Where a compiled step's device time goes: a ``jax.profiler`` trace of a few steps, summed per
XLA op and per model scope.

    python benchmarks/profile_step.py --configs=configs/cityscapes.py:r50 --dtypes=bfloat16 --out_dir=DIR
    python benchmarks/profile_step.py --work=forward ...        # the eval-mode forward instead
    python benchmarks/profile_step.py --size=512x512 --per_device_batch=1 ...   # not the recipe's

For each config and dtype: compiles the train step (``benchmarks/train_step.py``, the recipe's
per-device batch on random weights and a resident batch) or the forward, runs it ``--warmup``
times, then traces ``--steps`` steps and writes ``DIR/<config>_<dtype>_<work>.md``:

- the wall time per step and how much of it the device was busy (kernel time / wall time);
- the ``--top`` most expensive XLA ops (fusions, convolutions, custom calls), each with the JAX
  source scope it came from (the optimised HLO's ``op_name`` metadata);
- time per model scope (``backbone/layer3``, ``decode_head/memory``, ...), forward and
  backward apart (``transpose(jvp(...))`` is the backward pass).

On a GPU the trace's kernels carry their HLO op; on a CPU the thunks of XLA:CPU are the events.
``--keep_trace`` also writes the trace (perfetto JSON, gz) and the optimised HLO (gz) there.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_args import add_common_arguments  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_TRANSFORM = re.compile(r"^(\w+)\((.*)\)$")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX ``op_name`` it came from, from optimised HLO text; a fusion
    without metadata of its own takes its fused computation's most common one."""
    own: dict[str, str] = {}
    calls: dict[str, str] = {}
    in_computation: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    computation = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            computation = header.group(1)
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction:
            continue
        name = instruction.group(1)
        op_name = _OP_NAME.search(line)
        if op_name:
            own[name] = op_name.group(1)
            if computation:
                in_computation[computation][op_name.group(1)] += 1
        called = _CALLS.search(line)
        if called:
            calls[name] = called.group(1)
    names = dict(own)
    for name, called in calls.items():
        if name not in names and in_computation.get(called):
            names[name] = in_computation[called].most_common(1)[0][0]
    return names


def scope_of(op_name: str, depth: int = 2) -> tuple[str, str]:
    """("forward" | "backward", the first ``depth`` module names) of an ``op_name`` such as
    ``jit(step)/transpose(jvp(MCIBI))/backbone/layer3_2/conv2/conv_general_dilated``."""
    direction = "backward" if "transpose(" in op_name else "forward"
    modules = []
    for part in op_name.split("/")[:-1]:  # the last part is the primitive
        if re.match(r"p?jit\(", part):
            continue  # a jitted function's name, not a module
        while (transform := _TRANSFORM.match(part)) is not None:  # jvp(...), transpose(...)
            part = transform.group(2)
        if part and not part[:1].isupper():  # "MCIBI", "MCIBI.backbone_levels": the top module
            modules.append(part)
    return direction, "/".join(modules[:depth]) or "(outside the model)"


def _device_events(trace: dict) -> tuple[list[dict], str]:
    """The complete ('X') events of the accelerator's kernels, or of XLA:CPU's threads.

    A GPU's process holds its streams' kernels ("Stream #..." threads) beside derived lines
    ("XLA Modules", "XLA Ops") that cover the same time again: only the streams count. A TPU's
    has no streams: its "XLA Ops" line counts.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {
        (e.get("name"), e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")
    }
    devices = {
        pid
        for (kind, pid, _), name in names.items()
        if kind == "process_name" and "/device:" in name
    }
    complete = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None]
    if devices:
        threads = {
            (pid, tid): name
            for (kind, pid, tid), name in names.items()
            if kind == "thread_name" and pid in devices
        }
        for line in ("Stream", "XLA Ops"):
            chosen = {key for key, name in threads.items() if name.startswith(line)}
            if chosen:
                kept = [e for e in complete if (e["pid"], e.get("tid")) in chosen]
                return kept, "device kernels" if line == "Stream" else "device ops"
        return [e for e in complete if e["pid"] in devices], "device events"
    # XLA:CPU: the program's thunks run on the host; PjRt bookkeeping is not the model's time
    host = [
        e
        for e in complete
        if not e["name"].startswith(("$", "Pjit", "Common", "Pjrt", "PjRt", "Thread", "np."))
        and "::" not in e["name"]
    ]
    return host, "host events (XLA:CPU)"


def summarise(
    trace: dict, hlo_text: str, steps: int, wall_s: float, top: int, depth: int
) -> dict[str, Any]:
    """Per-step time of each HLO op and each (direction, scope), from a trace of ``steps`` steps."""
    events, source = _device_events(trace)
    op_names = hlo_op_names(hlo_text)
    per_op: dict[str, list] = {}
    per_scope: collections.Counter = collections.Counter()
    for event in events:
        args = event.get("args") or {}
        op = args.get("hlo_op") or event["name"]
        seconds = event["dur"] * 1e-6 / steps
        entry = per_op.setdefault(op, [0.0, 0, op_names.get(op, "")])
        entry[0] += seconds
        entry[1] += 1
        per_scope[scope_of(entry[2], depth) if entry[2] else ("?", "(no HLO metadata)")] += seconds
    busy = sum(v[0] for v in per_op.values())
    return {
        "source": source,
        "step_s": wall_s / steps,
        "busy_s": busy,
        "ops": sorted(
            (
                {"op": k, "s": v[0], "count": v[1] / steps, "op_name": v[2]}
                for k, v in per_op.items()
            ),
            key=lambda r: -r["s"],
        )[:top],
        "scopes": sorted(
            ({"direction": d, "scope": s, "s": t} for (d, s), t in per_scope.items()),
            key=lambda r: -r["s"],
        ),
    }


def markdown(title: str, summary: dict) -> str:
    step, busy = summary["step_s"], summary["busy_s"]
    lines = [
        f"## {title}",
        "",
        f"Wall time per step {step * 1e3:.2f} ms; {summary['source']} {busy * 1e3:.2f} ms per step "
        f"({busy / step * 100:.0f} % of the wall time).",
        "",
        "| op | ms/step | % of kernels | runs/step | JAX op_name |",
        "|---|---|---|---|---|",
    ]
    for r in summary["ops"]:
        lines.append(
            f"| {r['op']} | {r['s'] * 1e3:.3f} | {r['s'] / busy * 100:.1f} | {r['count']:.0f} "
            f"| {r['op_name'][-140:]} |"
        )
    lines += ["", "| direction | scope | ms/step | % |", "|---|---|---|---|"]
    for r in summary["scopes"]:
        lines.append(
            f"| {r['direction']} | {r['scope']} | {r['s'] * 1e3:.3f} | {r['s'] / busy * 100:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _compiled_work(
    spec: str,
    dtype: str,
    work: str,
    size: tuple[int, int] | None = None,
    per_device_batch: int | None = None,
) -> tuple[Any, Callable[[int], None]]:
    """(the compiled program, run(n) that runs and waits for n steps of it); ``size`` and
    ``per_device_batch`` None: the recipe's."""

    if work == "forward":
        from forward import forward_case
        from train_step import recipe_per_device_batch

        import mcibi_jax

        batch = per_device_batch or recipe_per_device_batch(
            mcibi_jax.load_config(spec).train.to_dict()
        )
        forward, variables, images = forward_case(spec, batch, size, dtype)
        compiled = forward.lower(variables, images).compile()

        return compiled, lambda n: repeat_steps(lambda: compiled(variables, images), n)

    from train_step import train_case

    case = train_case(spec, per_device_batch, size, dtype, steps_per_epoch=10_000)
    box = {"state": case.initial_state()}
    batch, key = case.random_batch(), case.dropout_key()
    compiled = case.step.lower(box["state"], batch, key).compile()

    def train_step():
        box["state"], metrics = compiled(box["state"], batch, key)
        return box["state"], metrics

    return compiled, lambda n: repeat_steps(train_step, n)


def repeat_steps(step: Callable[[], Any], n: int) -> None:
    """Calls ``step`` ``n`` >= 0 times and waits for the last result (none when n is 0)."""
    import jax

    out = None
    for _ in range(n):
        out = step()
    jax.block_until_ready(out)


def trace_run(
    run: Callable[[int], Any],
    hlo_text: str,
    title: str,
    steps: int,
    top: int = 30,
    depth: int = 2,
    keep: Path | None = None,
    stem: str = "profile",
) -> str:
    """Traces ``run(steps)`` (which runs and waits for that many steps of the compiled program
    whose optimised HLO is ``hlo_text``) and returns the summary as markdown; ``keep``: a folder
    for the trace and the HLO (gz)."""
    import jax

    trace_dir = Path(tempfile.mkdtemp(prefix="profile_step_"))
    try:
        jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
        started = time.perf_counter()
        run(steps)
        wall_s = time.perf_counter() - started
        jax.profiler.stop_trace()
        trace_file = next(trace_dir.rglob("perfetto_trace.json.gz"))
        trace = json.loads(gzip.decompress(trace_file.read_bytes()))
        text = markdown(title, summarise(trace, hlo_text, steps, wall_s, top, depth))
        if keep is not None:
            shutil.copy(trace_file, keep / f"{stem}.trace.json.gz")
            (keep / f"{stem}.hlo.txt.gz").write_bytes(gzip.compress(hlo_text.encode()))
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    return text


def profile(
    spec: str,
    dtype: str,
    work: str,
    steps: int,
    warmup: int,
    top: int,
    depth: int,
    keep: Path | None,
    size: tuple[int, int] | None = None,
    per_device_batch: int | None = None,
) -> str:
    import jax

    started = time.perf_counter()
    compiled, run = _compiled_work(spec, dtype, work, size, per_device_batch)
    print(f"{spec} {dtype} {work}: compiled in {time.perf_counter() - started:.1f} s", flush=True)
    run(warmup)
    title = f"{spec} {dtype} {work} on {jax.devices()[0].device_kind}"
    return trace_run(
        run, compiled.as_text(), title, steps, top, depth, keep, _stem(spec, dtype, work)
    )


def _stem(spec: str, dtype: str, work: str) -> str:
    name = re.sub(r"[^\w]+", "_", spec.replace("configs/", "").replace(".py", ""))
    return f"{name}_{dtype}_{work.replace(' ', '_')}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--work", choices=("train", "forward"), default="train")
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=30, help="how many XLA ops to list")
    parser.add_argument("--depth", type=int, default=2, help="module names per scope")
    parser.add_argument("--out_dir", default=".")
    parser.add_argument("--keep_trace", action="store_true")
    parser.add_argument(
        "--per_device_batch", type=int, default=None, help="instead of the recipe's"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(
            f"--steps must be positive and --warmup not negative: {args.steps}, {args.warmup}"
        )
    if args.per_device_batch is not None and args.per_device_batch < 1:
        parser.error(f"--per_device_batch must be positive, got {args.per_device_batch}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in [c.strip() for c in args.configs.split(",") if c.strip()]:
        for dtype in args.dtypes:
            text = profile(
                spec,
                dtype,
                args.work,
                args.steps,
                args.warmup,
                args.top,
                args.depth,
                out_dir if args.keep_trace else None,
                args.size,
                args.per_device_batch,
            )
            (out_dir / f"{_stem(spec, dtype, args.work)}.md").write_text(text)
            print(text, flush=True)


if __name__ == "__main__":
    main()
