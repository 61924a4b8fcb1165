"""benchmarks/accelerator.py (one process per case, time caps, OOM/crash rows, the table),
benchmarks/xla_stats.py (device peaks, MFU) and benchmarks/remat_memory.py's table."""

from __future__ import annotations

import functools
import json
import sys

import pytest

from mcibi_jax.data import pipeline
from tests.helpers import REPO, load_script

accelerator = load_script("benchmarks", "accelerator")
xla_stats = load_script("benchmarks", "xla_stats")
remat_memory = load_script("benchmarks", "remat_memory")


def test_smoke_run_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    rows = accelerator.main(["--smoke", "--dtypes=float32", f"--out_dir={tmp_path}"])
    assert [(r["work"], r["dtype"]) for r in rows] == [
        ("forward", "float32"),
        ("train step", "float32"),
        ("input stall", "float32"),
    ]
    assert not any(r.get("error") for r in rows), rows
    forward, train, stall = rows
    assert forward["images"] == train["images"] == 2 and train["size"] == [32, 32]
    for r in (forward, train):
        assert r["step_s"] > 0 and r["compile_s"] > 0 and r["flops"] > 0 and r["mfu"] is None
        assert r["memory_source"] == "xla_plan" and r["memory_plan"]["temp"] > 0
    assert train["flops"] > forward["flops"]
    threads = f"{pipeline.NUM_THREADS} threads"
    assert stall["step_s"] > 0 and stall["resident_step_s"] > 0 and threads in stall["loader"]
    text = (tmp_path / "accelerator.md").read_text()
    assert (
        "| config | work | dtype | batch | compile s | step ms |" in text and "(XLA plan)" in text
    )
    assert "MFU: n/a" in text and "| n/a |" in text
    saved = json.loads((tmp_path / "accelerator.json").read_text())
    assert saved["device"]["platform"] == "cpu" and len(saved["rows"]) == 3


def test_compile_pass_hands_the_programs_to_the_timed_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cache = tmp_path / "cache"
    rows = accelerator.main(
        [
            "--smoke",
            "--dtypes=bfloat16",
            "--stall_config=",
            "--compile_workers=1",
            f"--cache_dir={cache}",
            f"--out_dir={tmp_path}",
            "--profile",
        ]
    )
    assert [r["work"] for r in rows] == ["forward", "train step"]
    assert not any(r.get("error") for r in rows), rows
    for r in rows:  # compile time from the compile pass, the timed process's own is the load
        assert r["compile_workers"] == 1 and r["compile_s"] > 0 and r["load_s"] > 0
    assert any(cache.iterdir())
    assert "compile pass of 1 processes" in (tmp_path / "accelerator.md").read_text()
    profile = (tmp_path / "profile_benchmarks_tiny_config_py_bfloat16.md").read_text()
    assert "train step on cpu" in profile and "| op | ms/step |" in profile


def test_compile_pass_ends_by_its_deadline(monkeypatch):
    import time

    started, timeouts = [], []

    def fake_run_job(job, timeout_s, echo=None, command=None, env=None):
        started.append((job["config"], job["compile_only"], env["XLA_PYTHON_CLIENT_PREALLOCATE"]))
        timeouts.append(timeout_s)
        time.sleep(0.5)
        row = {"config": job["config"], "dtype": "bfloat16", "work": "forward", "compile_s": 1.0}
        return [row], None if timeout_s > 29 else f"timed out after {timeout_s:.0f} s"

    monkeypatch.setattr(accelerator, "run_job", fake_run_job)
    monkeypatch.setattr(accelerator, "MIN_COMPILE_JOB_S", 29.4)
    jobs = [{"config": c, "dtype": "bfloat16", "variant": None, "env": {}} for c in "abcdef"]
    times = accelerator.compile_pass(jobs, 2, 60, {}, deadline=time.monotonic() + 30.2)
    # two rounds of two (the second with less than 30 s left: cut short), then none
    assert started == [(c, True, "false") for c in "abcd"]
    assert all(29.4 <= t <= 30.2 for t in timeouts) and max(timeouts[2:]) < 30.0
    assert set(times) == {(c, "bfloat16", "forward", None) for c in "abcd"}


def test_jaxpr_flops_count_like_xla():
    """Matmuls and convolutions (padding taps left out) as XLA's cost analysis counts them; a
    scan's body times its length, a cond's costliest branch."""
    import jax
    import jax.numpy as jnp

    def conv(x, k, dilation, stride):
        return jax.lax.conv_general_dilated(
            x,
            k,
            (stride, stride),
            ((dilation, dilation), (dilation, dilation)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    x, k = jnp.zeros((2, 16, 24, 8)), jnp.zeros((3, 3, 8, 4))
    for dilation, stride in [(1, 1), (6, 1), (12, 1), (1, 2)]:
        f = jax.jit(functools.partial(conv, dilation=dilation, stride=stride))
        expected = f.lower(x, k).cost_analysis()["flops"]
        assert xla_stats.jaxpr_flops(jax.make_jaxpr(f)(x, k)) == expected
    grad = jax.jit(jax.grad(lambda x, k: (conv(x, k, 6, 1) ** 2).sum(), argnums=(0, 1)))
    assert xla_stats.jaxpr_flops(jax.make_jaxpr(grad)(x, k)) == pytest.approx(
        grad.lower(x, k).cost_analysis()["flops"], rel=0.02
    )
    a, b = jnp.zeros((5, 7)), jnp.zeros((7, 3))
    assert xla_stats.jaxpr_flops(jax.make_jaxpr(jnp.matmul)(a, b)) == 2 * 5 * 7 * 3

    def scanned(a):
        return jax.lax.scan(lambda c, _: (c @ jnp.eye(7), None), a, None, length=4)[0]

    assert xla_stats.jaxpr_flops(jax.make_jaxpr(scanned)(a)) == 4 * 2 * 5 * 7 * 7
    branches = jax.make_jaxpr(lambda p, a: jax.lax.cond(p, lambda a: a @ b, lambda a: a[:, :3], a))
    assert xla_stats.jaxpr_flops(branches(True, a)) == 2 * 5 * 7 * 3


def test_run_job_reports_timeouts_crashes_and_oom():
    row = {"config": "c", "dtype": "float32", "work": "forward", "step_s": 1.0}
    printed = f"print({accelerator.RESULT + json.dumps(row)!r}, flush=True)"
    echoed = []
    rows, why = accelerator.run_job(
        {},
        5,
        echoed.append,
        [
            sys.executable,
            "-c",
            printed + "; print('working', flush=True); import time; time.sleep(60)",
        ],
    )
    assert rows == [row] and why == "timed out after 5 s" and echoed == ["    | working"]
    rows, why = accelerator.run_job(
        {},
        30,
        echoed.append,
        [
            sys.executable,
            "-c",
            printed
            + (
                "; print('jaxlib.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating 3.5GiB'); raise SystemExit(1)"
            ),
        ],
    )
    assert rows == [row] and why.startswith(
        "out of memory (exit status 1): jaxlib.XlaRuntimeError: RESOURCE_EX"
    )
    rows, why = accelerator.run_job(
        {}, 30, echoed.append, [sys.executable, "-c", "import os; os.abort()"]
    )
    assert rows == [] and why.startswith("crashed (exit status -6)")
    rows, why = accelerator.run_job({}, 30, echoed.append, [sys.executable, "-c", printed])
    assert rows == [row] and why is None


def test_failures_become_rows_and_the_run_goes_on(tmp_path, monkeypatch):
    calls, variants = [], []

    def fake_run_job(job, timeout_s, echo=None, command=None, env=None):
        calls.append((job["config"], job["dtype"], bool(job["stall"])))
        variants.append((job["variant"], (env or {}).get("MCIBI_X")))
        device = {
            "work": "device",
            "device_kind": "NVIDIA H200",
            "platform": "gpu",
            "device_count": 1,
            "jax": "x",
        }
        if job["config"] == "b.py":
            return [device], "out of memory (exit status 1): RESOURCE_EXHAUSTED"
        done = {
            "config": job["config"],
            "dtype": job["dtype"],
            "work": "forward",
            "images": 2,
            "size": [8, 8],
            "compile_s": 1.0,
            "step_s": 0.01,
            "images_per_s": 200.0,
            "flops": 2e12,
            "tflops_per_s": 200.0,
            "mfu": 0.2,
            "peak_bytes": 2**30,
            "memory_plan": None,
            "memory_source": "device",
            **({"variant": job["variant"]} if job["variant"] else {}),
        }
        return [device, done], "timed out after 3 s"

    monkeypatch.setattr(accelerator, "run_job", fake_run_job)
    rows = accelerator.main(["--configs=a.py,b.py", "--stall_config=a.py", f"--out_dir={tmp_path}"])
    assert calls == [
        ("a.py", "bfloat16", True),
        ("b.py", "bfloat16", False),
        ("a.py", "float32", False),
        ("b.py", "float32", False),
    ]
    summary = {(r["config"], r["work"], r["dtype"]): r.get("error") for r in rows}
    assert summary[("a.py", "forward", "bfloat16")] is None
    assert summary[("a.py", "train step", "bfloat16")] == "timed out after 3 s"
    assert summary[("a.py", "input stall", "bfloat16")] == "timed out after 3 s"
    assert summary[("b.py", "train step", "float32")].startswith("out of memory")
    assert len(rows) == 3 + 2 + 2 + 2
    text = (tmp_path / "accelerator.md").read_text()
    assert "NVIDIA H200" in text and "MFU against H200 SXM: bfloat16 989.4 TFLOP/s" in text
    assert (
        "| a.py | forward | bfloat16 | 2x8x8 | 1.0 | 10.0 | 200.0 | 1 | 2 | 200 | 20.0 % |  |"
        in text
    )

    # variants of the stall config run after the bfloat16 cases, with their environment
    calls.clear()
    variants.clear()
    rows = accelerator.main(
        [
            "--configs=a.py,b.py",
            "--stall_config=a.py",
            "--variants=v1:MCIBI_X=1,v2:MCIBI_X=2+MCIBI_Y=3",
            f"--out_dir={tmp_path}",
        ]
    )
    assert calls[2:4] == [("a.py", "bfloat16", False)] * 2
    assert variants == [
        (None, None),
        (None, None),
        ("v1", "1"),
        ("v2", "2"),
        (None, None),
        (None, None),
    ]
    summary = {(r["config"], r.get("variant"), r["work"], r["dtype"]): r.get("error") for r in rows}
    assert summary[("a.py", "v1", "forward", "bfloat16")] is None
    assert summary[("a.py", "v2", "train step", "bfloat16")] == "timed out after 3 s"
    text = (tmp_path / "accelerator.md").read_text()
    assert "| a.py [v1] | forward | bfloat16 |" in text
    assert "Variants: v1 = MCIBI_X=1; v2 = MCIBI_X=2 MCIBI_Y=3" in text
    assert accelerator.parse_variants(" a:X=1+Y=, b:Z=2, c@configs/ade20k.py:vitl:Z=3 ") == [
        ("a", {"X": "1", "Y": ""}, None),
        ("b", {"Z": "2"}, None),
        ("c", {"Z": "3"}, "configs/ade20k.py:vitl"),
    ]
    for bad in ("a", "a:", ":X=1", "a:X", "a@:X=1"):
        with pytest.raises(SystemExit, match="--variants"):
            accelerator.parse_variants(bad)

    # a variant of another config runs that config
    calls.clear()
    variants.clear()
    accelerator.main(
        [
            "--configs=a.py",
            "--stall_config=a.py",
            "--dtypes=bfloat16",
            "--variants=v1:MCIBI_X=1,v2@b.py:MCIBI_X=2",
            f"--out_dir={tmp_path}",
        ]
    )
    assert calls[1:] == [("a.py", "bfloat16", False), ("b.py", "bfloat16", False)]
    assert variants[1:] == [("v1", "1"), ("v2", "2")]
    assert "v2 = MCIBI_X=2 (b.py)" in (tmp_path / "accelerator.md").read_text()

    calls.clear()
    rows = accelerator.main(
        ["--configs=a.py", "--stall_config=", "--budget_s=0", f"--out_dir={tmp_path}"]
    )
    assert (
        calls == []
        and {r["error"] for r in rows} == {"skipped: time budget spent"}
        and len(rows) == 4
    )


@pytest.mark.parametrize(
    "kind, entry",
    [
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("TPU v4", "TPU v4"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v5e", "TPU v5e"),
        ("TPU v5", "TPU v5p"),
        ("TPU v5p", "TPU v5p"),
        ("TPU v6 lite", "TPU v6e"),
        ("cpu", None),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_device_peaks(kind, entry):
    assert xla_stats.peak_entry(kind) == entry
    assert (xla_stats.peak_flops(kind, "bfloat16") is None) == (entry is None)


def test_mfu():
    assert xla_stats.mfu(989.4e12 / 2, 1.0, "NVIDIA H200", "bfloat16") == pytest.approx(0.5)
    assert xla_stats.mfu(66.9e12, 2.0, "NVIDIA H100 80GB HBM3", "float32") == pytest.approx(0.5)
    assert xla_stats.mfu(1e12, 1.0, "cpu", "float32") is None
    assert xla_stats.mfu(None, 1.0, "TPU v4", "bfloat16") is None


def test_plan_runs_bfloat16_and_the_stall_config_first():
    jobs = accelerator.plan(["r50", "vitl", "hrnet"], ["float32", "bfloat16"], "hrnet")
    assert jobs == [
        ("hrnet", "bfloat16", True),
        ("r50", "bfloat16", False),
        ("vitl", "bfloat16", False),
        ("hrnet", "float32", False),
        ("r50", "float32", False),
        ("vitl", "float32", False),
    ]
    assert accelerator.plan(["r50"], ["float32"], "r50") == [("r50", "float32", True)]


def test_remat_memory_table(monkeypatch, capsys, tmp_path):
    def fake_measure(spec, dtype_name, per_device_batch, size, remat):
        temp = (3 if remat else 5) * per_device_batch * 2**30
        return {
            "config": spec,
            "dtype": dtype_name,
            "per_device_batch": per_device_batch,
            "size": (512, 512),
            "remat": remat,
            "temp_bytes": temp,
            "argument_bytes": 2**30,
            "output_bytes": 2**30,
            "total_bytes": temp + 2**31,
            "flops": 3e12,
            "compile_s": 12.0,
        }

    monkeypatch.setattr(remat_memory, "measure", fake_measure)
    monkeypatch.setattr(remat_memory, "keep_remat_on_cpu", lambda: False)
    out = tmp_path / "remat.md"
    rows = remat_memory.main([f"--configs={REPO / 'configs/ade20k.py:vitl'}", f"--out={out}"])
    assert [(r["per_device_batch"], r["remat"]) for r in rows] == [
        (2, False),
        (2, True),
        (4, False),
        (4, True),
    ]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| config | dtype | per-device batch | remat | temp GiB |")
    assert lines[-1].endswith(
        "| float32 | 4 x 512x512 | on | 12.00 | 1.00 | 1.00 | 14.00 | 3.00 | 12 |"
    )


def test_model_flops_trace_the_model_formulation_afresh(monkeypatch):
    """A jitted function already traced with a faster path's variable set is traced again, its
    own function wrapped anew (traces are cached by function), in the model's formulation."""
    import os

    import jax
    import jax.numpy as jnp

    def f(a):
        plain = os.environ.get("MCIBI_DILATED_CONV") == "xla"
        return a @ a if plain else (a @ a) @ a

    a = jnp.ones((4, 4))
    jitted = jax.jit(f)
    monkeypatch.setenv("MCIBI_DILATED_CONV", "taps")
    assert xla_stats.jaxpr_flops(jax.make_jaxpr(jitted)(a)) == 2 * (2 * 4**3)
    assert xla_stats.model_flops(jitted, a) == 2 * 4**3
    assert os.environ["MCIBI_DILATED_CONV"] == "taps"
