"""Accelerator figures: forward and train step of every backbone in float32 and bfloat16.

    bash benchmarks/run_accelerator.sh [OUT_DIR]           # the whole set on one accelerator, < 8 minutes
    python benchmarks/accelerator.py --out_dir=OUT_DIR      # the same
    python benchmarks/accelerator.py --smoke --out_dir=/tmp/acc   # a tiny model at 32x32: seconds on a CPU

For each config (default: the five backbones, each at its recipe's crop) and dtype, a fresh
process compiles and times the jitted eval-mode forward and the jitted data-parallel train step
(``benchmarks/forward.py``, ``benchmarks/train_step.py``) at the recipe's per-device batch
(``train.batch_size // train.num_replicas``), on random weights and a resident random batch.
A process per case keeps the device's peak memory statistic that case's own, contains a crash
or an out-of-memory error, and lets a time cap stop a case that runs too long (its row then
says so and the run goes on). Cases run bfloat16 first, and none starts once ``--budget_s``
is spent (its row says "skipped").

Per row: compile time (lower + compile), step time (median of 3 timed repeats of n steps after
a warm-up, n sized to ``--measure_s``), images/s, peak device memory (``peak_bytes_in_use``; on
a CPU, which keeps no device statistics, XLA's memory plan of the compiled program instead:
arguments + outputs + scratch), FLOPs per step of the model's own formulation, whatever
paths the program takes (``xla_stats.model_flops``: counted on the jaxpr), achieved TFLOP/s and
MFU against the device's peak (``xla_stats.PEAKS``; 'n/a' for an unknown device).

Input stall (``--stall_config``, default the Cityscapes R-50 recipe in bfloat16): after its
train step, the same compiled step is fed batches from the Grain training pipeline
(``mcibi_jax.data.pipeline.train_loader`` with the training defaults, on a synthetic source of
that dataset's image sizes, JPEG/PNG decoded on every read) the way the training loop feeds it
(the next batch is prepared while the device runs, metrics read one step late), then the
resident batch again; the row compares both step times.

``--remat``: train steps with ``model.backbone.remat=True`` and ``model.head.remat=True`` (FLOPs,
TFLOP/s and MFU still count the model's FLOPs, not the recomputation). Writes ``accelerator.md``
and ``accelerator.json`` to ``--out_dir``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmark_args import DEFAULT_CONFIGS, add_common_arguments, remat_overrides  # noqa: E402

RESULT = "RESULT "  # a child's result lines; anything else it prints is progress
WORKS = ("forward", "train step", "input stall")
SMOKE_CONFIG = "benchmarks/tiny_config.py"
COMPILE_PASS_SHARE = 0.55  # the compile pass ends after this share of --budget_s at the latest
MIN_COMPILE_JOB_S = 20.0  # no compile job starts with less time than this before that
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


# --------------------------------------------------------------------------------------------
# One case, in a child process


def _emit(row: dict) -> None:
    print(RESULT + json.dumps(row), flush=True)


def _progress(text: str) -> None:
    print(text, flush=True)


def _error_row(job: dict, work: str, error: BaseException) -> dict:
    message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
    return {
        "config": job["config"],
        "dtype": job["dtype"],
        "work": work,
        "error": message,
        "oom": any(marker in str(error) for marker in OOM_MARKERS),
    }


def timed(
    run: Callable[[int], float], measure_s: float, min_iters: int, max_iters: int
) -> tuple[float, int]:
    """(median seconds per step over 3 repeats of n steps, steps run); ``run(n)`` runs n steps,
    waits for them and returns the seconds taken; n fills about ``measure_s`` in all."""
    first = run(1)
    n = int(min(max_iters, max(min_iters, measure_s / 3 / max(first, 1e-6))))
    per_step = sorted(run(n) / n for _ in range(3))
    return per_step[1], 1 + 3 * n


def _figures(
    job: dict,
    work: str,
    flops: float | None,
    compiled: Any,
    compile_s: float,
    step_s: float,
    iters: int,
    images: int,
    device: Any,
) -> dict:
    import xla_stats
    from train_step import peak_memory

    peak = peak_memory(device)
    return {
        "config": job["config"],
        "dtype": job["dtype"],
        "work": work,
        "images": images,
        "compile_s": compile_s,
        "step_s": step_s,
        "iters": iters,
        "images_per_s": images / step_s,
        "flops": flops,
        "flops_xla": xla_stats.compiled_flops(compiled),
        "tflops_per_s": flops / step_s / 1e12 if flops else None,
        "mfu": xla_stats.mfu(flops, step_s, device.device_kind, job["dtype"]),
        "peak_bytes": peak,
        "memory_plan": xla_stats.compiled_memory(compiled),
        "memory_source": "device" if peak is not None else "xla_plan",
    }


def _compile_row(job: dict, work: str, compile_s: float) -> dict:
    return {"config": job["config"], "dtype": job["dtype"], "work": work, "compile_s": compile_s}


def measure_forward(job: dict, device: Any) -> tuple[dict, Any]:
    """The forward's row, and the variables it ran on (the train step starts from them). With
    ``job["compile_only"]``: compiles, and the row holds the compile time alone."""
    import xla_stats
    from forward import forward_case
    from train_step import recipe_per_device_batch

    import mcibi_jax

    size = tuple(job["size"]) if job["size"] else None
    batch = job["per_device_batch"] or recipe_per_device_batch(
        mcibi_jax.load_config(job["config"]).train.to_dict()
    )
    started = time.perf_counter()
    forward, variables, images = forward_case(job["config"], batch, size, job["dtype"])
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = forward.lower(variables, images).compile()
    compile_s = time.perf_counter() - started
    if job.get("compile_only"):
        return _compile_row(job, "forward", compile_s), variables
    compiled(variables, images).block_until_ready()  # warm-up

    def run(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            out = compiled(variables, images)
        out.block_until_ready()
        return time.perf_counter() - started

    step_s, iters = timed(run, job["measure_s"], job["min_iters"], job["max_iters"])
    flops = xla_stats.model_flops(forward, variables, images)
    row = _figures(job, "forward", flops, compiled, compile_s, step_s, iters, batch, device)
    row.update(per_device_batch=batch, size=list(images.shape[1:3]), init_s=init_s)
    return row, variables


def measure_train(job: dict, device: Any, handed: dict | None = None) -> tuple[dict, dict]:
    """The train step's row, and what the input-stall measurement reuses. ``handed["variables"]``
    (taken out, so that nothing else holds them): the forward's, to start from. With
    ``job["compile_only"]``: compiles, and the row holds the compile time alone."""
    import jax
    from train_step import train_case

    size = tuple(job["size"]) if job["size"] else None
    case = train_case(
        job["config"],
        job["per_device_batch"],
        size,
        job["dtype"],
        steps_per_epoch=10_000,
        overrides=job.get("overrides", ()),
    )
    started = time.perf_counter()
    # the forward's variables when it ran: one initialisation (a compile) fewer
    variables = (handed or {}).pop("variables", None)
    state, batch, key = (
        case.initial_state(variables=variables),
        case.random_batch(),
        case.dropout_key(),
    )
    del variables
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    compiled = case.step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - started
    if job.get("compile_only"):
        return _compile_row(job, "train step", compile_s), {}
    flops = case.model_flops()
    box = {"state": state}
    state = None  # donated to the step on accelerators: only box holds the live one

    def run(n: int, batches: Callable[[], Any] = lambda: batch) -> float:
        started = time.perf_counter()
        pending = None
        for _ in range(n):
            box["state"], metrics = compiled(box["state"], batches(), key)
            if pending is not None:  # the training loop reads each step's metrics one step late
                float(pending["loss"])
            pending = metrics
        jax.block_until_ready((box["state"], pending))
        return time.perf_counter() - started

    run(1)  # warm-up
    step_s, iters = timed(run, job["measure_s"], job["min_iters"], job["max_iters"])
    if job.get("profile"):
        _profile(job, compiled, run)
    row = _figures(
        job, "train step", flops, compiled, compile_s, step_s, iters, case.batch_size, device
    )
    row.update(
        per_device_batch=case.per_device_batch,
        size=list(case.size),
        num_devices=case.mesh.size,
        init_s=init_s,
        overrides=list(job.get("overrides", ())),
    )
    return row, {"case": case, "run": run}


def _profile(job: dict, compiled: Any, run: Callable[[int], float]) -> None:
    """Writes the per-op and per-scope summary of a trace of a few train steps
    (``benchmarks/profile_step.py``) to ``job["profile"]["out_dir"]``."""
    import jax
    import profile_step

    variant = f" [{job['variant']}]" if job.get("variant") else ""
    stem = "profile_" + re.sub(r"[^\w]+", "_", f"{job['config']}_{job['dtype']}{variant}").strip(
        "_"
    )
    title = f"{job['config']} {job['dtype']} train step{variant} on {jax.devices()[0].device_kind}"
    text = profile_step.trace_run(
        run,
        compiled.as_text(),
        title,
        job["profile"]["steps"],
        top=job["profile"]["top"],
    )
    path = Path(job["profile"]["out_dir"]) / f"{stem}.md"
    path.write_text(text)
    _progress(f"wrote {path}")


def measure_stall(job: dict, context: dict) -> dict:
    """Step time with Grain batches (made ahead while the device runs, as the training loop
    gets them: ``GrainTraining.epoch``) vs the resident batch."""
    import itertools

    from data import REALISTIC_SIZES, SyntheticSource

    from mcibi_jax.data.pipeline import GrainTraining

    case, run = context["case"], context["run"]
    config = case.config.copy_and_resolve_references()
    config.train.batch_size = case.batch_size  # one host feeds every device
    sizes = [tuple(s) for s in job["stall"]["source_sizes"]] or REALISTIC_SIZES.get(
        config.dataset.name, [tuple(2 * s for s in case.size)]
    )
    source = SyntheticSource(sizes, int(config.dataset.num_classes), count=16, decode=True)
    training = GrainTraining(config, source, case.mesh)
    loader = training.loader
    steps = job["stall"]["steps"]

    def stream() -> Any:
        for epoch in itertools.count(1):
            yield from training.epoch(epoch)

    batches = stream()
    run(2, lambda: next(batches))  # start-up: the first batches and the prefetch threads
    grain_s = run(steps, lambda: next(batches)) / steps
    batches.close()  # stops the thread making batches ahead
    resident_s = run(steps) / steps
    return {
        "config": job["config"],
        "dtype": job["dtype"],
        "work": "input stall",
        "images": case.batch_size,
        "steps": steps,
        "step_s": grain_s,
        "resident_step_s": resident_s,
        "slowdown": grain_s / resident_s - 1,
        "loader": f"{loader.num_workers} workers, {loader.num_threads} threads, {source!r}",
        "source_sizes": [list(s) for s in sizes],
    }


def _attention_note() -> str:
    """Which attention MCIBI_ATTENTION's check chose for each shape so far in this process."""
    from mcibi_jax.models.cudnn_attention import checked_attention

    return "; ".join(
        f"attention {shape.num_queries}x{shape.num_keys}x{shape.heads}x{shape.head_dims}: "
        + ("cuDNN" if problem is None else f"XLA ({problem})")
        for shape, problem in checked_attention().items()
    )


def child(job: dict) -> None:
    """Runs one config and dtype (forward, train step, optionally the input stall), printing a
    RESULT line per measurement; a failing measurement becomes an error row."""
    import jax

    def emit(row: dict) -> None:  # every row names the job's variant and the attention taken
        attention = _attention_note() if row.get("work") in ("forward", "train step") else ""
        _emit(
            {
                **row,
                **({"variant": job["variant"]} if job.get("variant") else {}),
                **({"attention": attention} if attention else {}),
            }
        )

    device = jax.devices()[0]
    emit(
        {
            "work": "device",
            "device_kind": device.device_kind,
            "platform": device.platform,
            "device_count": jax.device_count(),
            "jax": jax.__version__,
        }
    )
    tag = f"{job['config']} {job['dtype']}" + (" (compile only)" if job.get("compile_only") else "")
    handed = {}
    try:
        _progress(f"{tag}: forward")
        row, handed["variables"] = measure_forward(job, device)
        emit(row)
    except Exception as error:  # reported, the next measurement still runs
        emit(_error_row(job, "forward", error))
    try:
        _progress(f"{tag}: train step")
        row, context = measure_train(job, device, handed)
        emit(row)
    except Exception as error:
        emit(_error_row(job, "train step", error))
        return
    if job.get("stall") and not job.get("compile_only"):
        try:
            _progress(f"{tag}: input stall")
            emit(measure_stall(job, context))
        except Exception as error:
            emit(_error_row(job, "input stall", error))


# --------------------------------------------------------------------------------------------
# The whole set, from the parent process


def run_job(
    job: dict,
    timeout_s: float,
    echo: Callable[[str], None] = _progress,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[list[dict], str | None]:
    """Runs ``job`` in a fresh process (``command``: instead of this script's ``--child``; ``env``:
    added to its environment) for at most ``timeout_s``; returns its result rows and, where it
    did not finish cleanly, why (timed out, exit status, out of memory)."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    command = command or [
        sys.executable,
        "-u",
        str(Path(__file__).resolve()),
        "--child",
        json.dumps(job),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    rows: list[dict] = []
    tail: list[str] = []

    def read() -> None:
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT):
                rows.append(json.loads(line[len(RESULT) :]))
            else:
                tail.append(line)
                del tail[:-30]
                echo(f"    | {line}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(5)
        return rows, f"timed out after {timeout_s:.0f} s"
    reader.join(5)
    if process.returncode != 0:
        text = "\n".join(tail)
        kind = "out of memory" if any(marker in text for marker in OOM_MARKERS) else "crashed"
        last = next((line for line in reversed(tail) if line.strip()), "")
        return rows, f"{kind} (exit status {process.returncode}): {last[:200]}"
    return rows, None


def plan(
    configs: list[str], dtypes: list[str], stall_config: str | None
) -> list[tuple[str, str, bool]]:
    """(config, dtype, with the input stall) in running order: bfloat16 first, the stall config
    first within a dtype (the cases that matter most run before the budget can run out)."""
    stall_dtype = "bfloat16" if "bfloat16" in dtypes else dtypes[0]
    order = sorted(
        ((d, c) for d in dtypes for c in configs),
        key=lambda dc: (dc[0] != "bfloat16", dc[1] != stall_config, configs.index(dc[1])),
    )
    return [(c, d, c == stall_config and d == stall_dtype) for d, c in order]


def fill_missing(
    rows: list[dict],
    config: str,
    dtype: str,
    works: tuple[str, ...],
    why: str,
    variant: str | None = None,
) -> list[dict]:
    done = {
        r["work"]
        for r in rows
        if (r.get("config"), r.get("dtype"), r.get("variant")) == (config, dtype, variant)
    }
    return [
        {
            "config": config,
            "dtype": dtype,
            "work": w,
            "error": why,
            "oom": why.startswith("out of memory"),
            **({"variant": variant} if variant else {}),
        }
        for w in works
        if w not in done
    ]


def _gib(value: int | None) -> str:
    return "" if value is None else f"{value / 2**30:.3g}"


def _case_name(config: str, dtype: str, variant: str | None) -> str:
    return f"{config} {dtype}" + (f" [{variant}]" if variant else "")


def _config_cell(r: dict) -> str:
    return r["config"] + (f" [{r['variant']}]" if r.get("variant") else "")


def format_row(r: dict) -> list[str]:
    """The markdown table cells of one result row."""
    size = "x".join(str(s) for s in r["size"]) if r.get("size") else ""
    batch = f"{r.get('images', '')}x{size}" if size else ""
    if r.get("error"):
        return [
            _config_cell(r),
            r["work"],
            r["dtype"],
            batch,
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            ("OOM: " if r.get("oom") and "memory" not in r["error"] else "") + r["error"],
        ]
    if r["work"] == "input stall":
        note = (
            f"Grain {r['step_s'] * 1000:.1f} ms vs resident {r['resident_step_s'] * 1000:.1f} ms per step "
            f"({r['slowdown'] * 100:+.1f} %); {r['loader']}"
        )
        return [
            _config_cell(r),
            r["work"],
            r["dtype"],
            "",
            "",
            f"{r['step_s'] * 1000:.1f}",
            "",
            "",
            "",
            "",
            "",
            note,
        ]
    plan_ = r.get("memory_plan") or {}
    memory = (
        _gib(r["peak_bytes"])
        if r["memory_source"] == "device"
        else (f"{_gib(plan_.get('peak'))} (XLA plan)" if plan_ else "")
    )
    return [
        _config_cell(r),
        r["work"],
        r["dtype"],
        batch,
        f"{r['compile_s']:.1f}",
        f"{r['step_s'] * 1000:.1f}",
        f"{r['images_per_s']:.1f}",
        memory,
        f"{r['flops'] / 1e12:.3g}" if r.get("flops") else "",
        f"{r['tflops_per_s']:.3g}" if r.get("tflops_per_s") else "",
        f"{r['mfu'] * 100:.1f} %" if r.get("mfu") is not None else "n/a",
        ", ".join([*r.get("overrides", ()), *([r["attention"]] if r.get("attention") else [])]),
    ]


HEADER = [
    "config",
    "work",
    "dtype",
    "batch",
    "compile s",
    "step ms",
    "images/s",
    "peak memory GiB",
    "TFLOP/step",
    "TFLOP/s",
    "MFU",
    "note",
]


def markdown(
    rows: list[dict],
    device: dict | None,
    started: str,
    elapsed_s: float,
    variants: list[tuple[str, dict[str, str], str | None]] = (),
) -> str:
    import xla_stats

    kind = device["device_kind"] if device else "unknown device"
    entry = xla_stats.peak_entry(kind) if device else None
    lines = [
        f"Measured {started} on {kind} x{device['device_count'] if device else '?'} "
        f"({device['platform'] if device else '?'}, jax {device['jax'] if device else '?'}) in {elapsed_s:.0f} s.",
        "",
        f"MFU against {entry}: "
        + ", ".join(f"{d} {p / 1e12:.1f} TFLOP/s" for d, p in xla_stats.PEAKS[entry].items())
        if entry
        else "MFU: n/a (no peak known for this device kind).",
        "Peak memory: the device's peak_bytes_in_use of the case's process (the train step's includes its forward's)"
        if any(r.get("memory_source") == "device" for r in rows)
        else "Peak memory: XLA's memory plan of the compiled program (arguments + outputs + scratch): "
        "this backend keeps no device memory statistics.",
        "FLOPs: the matrix products and convolutions of the step's jaxpr, 2 per multiply-add "
        "(conv taps that read padding not counted), the same on every backend, traced in the "
        "model's own formulation (XLA's dilated convs, matmul attention without chunks, no "
        "remat), whatever the program runs.",
    ]
    workers = {r["compile_workers"] for r in rows if r.get("compile_workers")}
    if workers:
        lines.append(
            f"Compile s: measured in a compile pass of {max(workers)} processes at once (an upper "
            "bound); the timed processes loaded the programs from the compilation cache."
        )
    if variants:
        lines.append(
            "Variants: "
            + "; ".join(
                f"{name} = {' '.join(f'{k}={v}' for k, v in env.items())}"
                + (f" ({config})" if config else "")
                for name, env, config in variants
            )
            + " (every row's FLOPs and MFU count the model's own formulation, whatever path a"
            " variant takes)."
        )
    lines += [
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _sorted(rows: list[dict], configs: list[str], dtypes: list[str]) -> list[dict]:
    def key(r: dict) -> tuple:
        config = configs.index(r["config"]) if r["config"] in configs else len(configs)
        return (
            config,
            r.get("variant") or "",
            WORKS.index(r["work"]) if r["work"] in WORKS else 9,
            dtypes.index(r["dtype"]),
        )

    return sorted(rows, key=key)


def parse_variants(text: str) -> list[tuple[str, dict[str, str], str | None]]:
    """``"a:X=1+Y=2,b@c.py:vitl:X=3"`` -> ``[("a", {"X": "1", "Y": "2"}, None), ("b", {"X":
    "3"}, "c.py:vitl")]``: a name, its settings and the config it runs (None: --variant_config)."""
    variants = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        head, _, settings = item.rpartition(":")
        name, at, config = head.partition("@")
        pairs = [setting.partition("=") for setting in settings.split("+") if setting]
        if (
            not name
            or (at and not config)
            or not pairs
            or any(not key or not sep for key, sep, _ in pairs)
        ):
            raise SystemExit(
                f"--variants: expected NAME[@CONFIG]:VAR=VALUE[+VAR=VALUE...], got {item!r}"
            )
        variants.append((name, {key: value for key, _, value in pairs}, config or None))
    return variants


def cache_env(cache_dir: str) -> dict[str, str]:
    """Environment for children that share compiled programs through JAX's persistent cache."""
    return {
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def compile_pass(
    jobs: list[dict],
    workers: int,
    timeout_s: float,
    env: dict[str, str],
    deadline: float = float("inf"),
) -> dict[tuple, float]:
    """Compiles the jobs' programs, ``workers`` processes at once and in order, into the cache
    of ``env``, each for at most ``timeout_s`` and none past ``deadline`` (``time.monotonic()``):
    what is not compiled by then is left to the case's timed process. Returns the compile
    seconds per (config, dtype, work, variant). The timed pass then loads them: the host's cores
    compile while no step is being timed."""
    import concurrent.futures

    compile_env = {
        **env,
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }  # several processes share the device

    def compile_job(job: dict) -> list[dict]:
        left = deadline - time.monotonic()
        if left < MIN_COMPILE_JOB_S:
            return []
        tag = _case_name(job["config"], job["dtype"], job["variant"])
        rows, why = run_job(
            {**job, "compile_only": True},
            min(timeout_s, left),
            lambda line: _progress(f"  [{tag} compile] {line.strip()}"),
            env={**compile_env, **job["env"]},
        )
        if why is not None:
            _progress(f"  [{tag} compile] did not finish: {why}")
        return rows

    times = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for rows in pool.map(compile_job, jobs):
            for r in rows:
                if "compile_s" in r and not r.get("error"):
                    times[(r["config"], r["dtype"], r["work"], r.get("variant"))] = r["compile_s"]
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--per_device_batch",
        type=int,
        default=None,
        help="images per device (default: each recipe's batch_size // num_replicas)",
    )
    parser.add_argument(
        "--out_dir", default=".", help="where accelerator.md and accelerator.json go"
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=450.0,
        help="no case starts after this many seconds from the start (default %(default)s)",
    )
    parser.add_argument(
        "--case_timeout_s",
        type=float,
        default=180.0,
        help="a config and dtype (forward + train step) is stopped after this long",
    )
    parser.add_argument(
        "--measure_s", type=float, default=3.0, help="timed seconds per measurement (about)"
    )
    parser.add_argument("--min_iters", type=int, default=3)
    parser.add_argument("--max_iters", type=int, default=30)
    parser.add_argument(
        "--stall_config",
        default=DEFAULT_CONFIGS[0],
        help="config whose train step is also fed from the Grain pipeline ('' for none)",
    )
    parser.add_argument("--stall_steps", type=int, default=20)
    parser.add_argument(
        "--remat",
        action="store_true",
        help="train steps with model.backbone.remat and model.head.remat (rematerialisation)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_CONFIG} only, short measurements: checks the script in seconds on a CPU",
    )
    parser.add_argument(
        "--compile_workers",
        type=int,
        default=0,
        help="first compile every case, this many processes at once, into a persistent "
        "compilation cache that the timed processes then load from (0: each timed process "
        "compiles its own)",
    )
    parser.add_argument(
        "--cache_dir", default=None, help="the compilation cache (default: a new temporary folder)"
    )
    parser.add_argument(
        "--variants",
        default="",
        help="extra cases of --variant_config (or of CONFIG) with environment settings, run "
        "after the bfloat16 cases: comma-separated NAME[@CONFIG]:VAR=VALUE[+VAR=VALUE...], e.g. "
        "xla:MCIBI_DILATED_CONV=xla,s2b:MCIBI_DILATED_CONV=space_to_batch,"
        "xla_attention@configs/ade20k.py:vitl:MCIBI_ATTENTION=xla",
    )
    parser.add_argument(
        "--variant_config",
        default=None,
        help="the config the variants run (default: the stall config, else the first)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also trace a few train steps of the variant config's bfloat16 cases (plain and "
        "each variant) and write their time per XLA op and model scope "
        "(benchmarks/profile_step.py) to profile_*.md beside the table",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return []

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    stall_config, source_sizes = args.stall_config, []
    if args.smoke:
        configs, source_sizes = [SMOKE_CONFIG], [(64, 96), (48, 64)]
        stall_config = SMOKE_CONFIG if stall_config else None
        args.measure_s, args.min_iters, args.max_iters, args.stall_steps = 0.05, 1, 2, 2
    if stall_config and stall_config not in configs:
        configs.append(stall_config)
    jobs = plan(configs, args.dtypes, stall_config or None)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    start = time.monotonic()
    rows: list[dict] = []
    device = None
    _progress(
        f"{len(jobs)} cases, budget {args.budget_s:.0f} s, at most {args.case_timeout_s:.0f} s each"
    )

    variants = parse_variants(args.variants)

    def write() -> str:
        """The tables so far (after every case: a run stopped from outside keeps what it did)."""
        elapsed = time.monotonic() - start
        ordered = _sorted(rows, configs, args.dtypes)
        text = markdown(ordered, device, started_at, elapsed, variants)
        (out_dir / "accelerator.md").write_text(text)
        (out_dir / "accelerator.json").write_text(
            json.dumps(
                {"started": started_at, "elapsed_s": elapsed, "device": device, "rows": ordered},
                indent=1,
            )
        )
        return text

    variant_config = args.variant_config or stall_config or configs[0]
    variant_dtype = "bfloat16" if "bfloat16" in args.dtypes else args.dtypes[0]
    variant_jobs = [
        (config or variant_config, variant_dtype, False, name, variant_env)
        for name, variant_env, config in variants
    ]
    profiled = {variant_config} | {config for *_, config in variants if config}
    after = sum(1 for _, dtype, _ in jobs if dtype == variant_dtype)
    jobs = [(c, d, s, None, {}) for c, d, s in jobs]
    jobs[after:after] = variant_jobs

    def make_job(
        config: str, dtype: str, stall: bool, variant: str | None, variant_env: dict
    ) -> dict:
        return {
            "config": config,
            "dtype": dtype,
            "variant": variant,
            "env": variant_env,
            "per_device_batch": args.per_device_batch,
            "size": args.size,
            "measure_s": args.measure_s,
            "min_iters": args.min_iters,
            "max_iters": args.max_iters,
            "overrides": remat_overrides(True) if args.remat else [],
            "stall": {"steps": args.stall_steps, "source_sizes": source_sizes} if stall else None,
            "profile": {"out_dir": str(out_dir.resolve()), "steps": 3, "top": 40}
            if args.profile and config in profiled and dtype == variant_dtype
            else None,
        }

    env, compile_times = {}, {}
    if args.compile_workers > 0:
        env = cache_env(args.cache_dir or tempfile.mkdtemp(prefix="accelerator_cache_"))
        _progress(f"compiling {len(jobs)} cases, {args.compile_workers} processes at once")
        compile_times = compile_pass(
            [make_job(*j) for j in jobs],
            args.compile_workers,
            min(args.case_timeout_s, args.budget_s),
            env,
            # what is not compiled by then compiles in its timed process
            deadline=start + COMPILE_PASS_SHARE * args.budget_s,
        )
        _progress(f"compiled in {time.monotonic() - start:.0f} s")

    for i, (config, dtype, stall, variant, variant_env) in enumerate(jobs, 1):
        works = WORKS if stall else WORKS[:2]
        left = args.budget_s - (time.monotonic() - start)
        name = _case_name(config, dtype, variant)
        if left < 20:
            rows += fill_missing([], config, dtype, works, "skipped: time budget spent", variant)
            _progress(f"[{i}/{len(jobs)}] {name}: skipped (time budget spent)")
            continue
        _progress(f"[{i}/{len(jobs)}] {name} ({left:.0f} s of the budget left)")
        job = make_job(config, dtype, stall, variant, variant_env)
        job_rows, why = run_job(job, min(args.case_timeout_s, left), env={**env, **variant_env})
        device = device or next((r for r in job_rows if r["work"] == "device"), None)
        results = [r for r in job_rows if r["work"] != "device"]
        for r in results:
            compiled_s = compile_times.get((r["config"], r["dtype"], r["work"], r.get("variant")))
            if compiled_s is not None and "compile_s" in r:
                r["load_s"], r["compile_s"] = r["compile_s"], compiled_s
                r["compile_workers"] = args.compile_workers
        if why is not None:
            results += fill_missing(results, config, dtype, works, why, variant)
        for r in results:
            _progress(f"    {' | '.join(cell for cell in format_row(r)[1:] if cell)}")
        rows += results
        write()
    print(write(), flush=True)
    _progress(f"wrote {out_dir / 'accelerator.md'} and {out_dir / 'accelerator.json'}")
    return _sorted(rows, configs, args.dtypes)


if __name__ == "__main__":
    main()
