"""benchmarks/profile_step.py: a traced train step summed per XLA op and per model scope."""

from __future__ import annotations

import pytest

from tests.helpers import REPO, load_script

profile_step = load_script("benchmarks", "profile_step")

HLO = """HloModule jit_step

%fused_computation.3 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %exp = f32[4]{0} exponential(%p), metadata={op_name="jit(step)/jvp(MCIBI)/memory_module/exp"}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %fusion.3 = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation.3
  ROOT %add.1 = f32[4]{0} add(%fusion.3, %a), metadata={op_name="jit(step)/transpose(jvp(MCIBI))/backbone_net/layer4/0/add"}
}
"""


def test_hlo_op_names_and_scopes():
    names = profile_step.hlo_op_names(HLO)
    assert names["add.1"].endswith("layer4/0/add")
    assert names["fusion.3"].endswith("memory_module/exp")  # from its fused computation
    assert profile_step.scope_of(names["add.1"]) == ("backward", "backbone_net/layer4")
    assert profile_step.scope_of(names["fusion.3"], 1) == ("forward", "memory_module")
    assert profile_step.scope_of("jit(step)/jvp(jit(log_softmax))/exp") == (
        "forward",
        "log_softmax",
    )
    assert profile_step.scope_of("jit(step)/add") == ("forward", "(outside the model)")


def kernel(name: str, microseconds: float, hlo_op: str) -> dict:
    """A kernel's event on the GPU's stream 7."""
    return {
        "ph": "X",
        "pid": 1,
        "tid": 7,
        "name": name,
        "dur": microseconds,
        "args": {"hlo_op": hlo_op},
    }


def test_summary_of_device_kernels():
    """Only the GPU's streams count: its "XLA Modules" and "XLA Ops" lines repeat their time."""
    trace = {
        "traceEvents": [
            {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7"}},
            {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
            {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Modules"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            kernel("k1", 300.0, "fusion.3"),
            kernel("k2", 100.0, "add.1"),
            kernel("k1", 300.0, "fusion.3"),
            {"ph": "X", "pid": 1, "tid": 8, "name": "fusion.3", "dur": 600.0},
            {"ph": "X", "pid": 1, "tid": 9, "name": "jit_step", "dur": 800.0},
            {"ph": "X", "pid": 2, "tid": 1, "name": "host", "dur": 9000.0},
        ]
    }
    summary = profile_step.summarise(trace, HLO, steps=2, wall_s=0.002, top=5, depth=2)
    assert summary["source"] == "device kernels"
    assert summary["busy_s"] == pytest.approx(350e-6)  # per step
    assert [r["op"] for r in summary["ops"]] == ["fusion.3", "add.1"]
    assert summary["ops"][0]["count"] == 1
    assert summary["scopes"][0] == {
        "direction": "forward",
        "scope": "memory_module",
        "s": pytest.approx(300e-6),
    }
    text = profile_step.markdown("t", summary)
    assert "| fusion.3 | 0.300 | 85.7 | 1 |" in text and "(35 % of the wall time)" in text
    # a TPU: no streams, its "XLA Ops" line
    tpu = [e for e in trace["traceEvents"] if e.get("tid") != 7]
    summary = profile_step.summarise({"traceEvents": tpu}, HLO, 2, 0.002, 5, 2)
    assert summary["source"] == "device ops" and summary["busy_s"] == pytest.approx(300e-6)


def test_profiles_a_train_step_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    profile_step.main(
        [
            "--configs=benchmarks/tiny_config.py",
            "--dtypes=float32",
            "--steps=2",
            "--warmup=1",
            f"--out_dir={tmp_path}",
            "--keep_trace",
        ]
    )
    text = (tmp_path / "benchmarks_tiny_config_float32_train.md").read_text()
    assert "host events (XLA:CPU)" in text and "| backward |" in text
    assert (tmp_path / "benchmarks_tiny_config_float32_train.trace.json.gz").stat().st_size > 0
    assert (tmp_path / "benchmarks_tiny_config_float32_train.hlo.txt.gz").stat().st_size > 0


def test_a_batch_below_one_is_refused():
    with pytest.raises(SystemExit):
        profile_step.main(["--per_device_batch=0"])


def test_no_warmup_runs_nothing_and_steps_are_counted():
    """``--warmup=0`` once crashed (the last step's result was read before any step ran)."""
    calls = []
    profile_step.repeat_steps(lambda: calls.append(1), 0)
    assert calls == []
    profile_step.repeat_steps(lambda: calls.append(1) or len(calls), 3)
    assert calls == [1, 1, 1]


@pytest.mark.parametrize("flag", ["--steps=0", "--warmup=-1"])
def test_step_counts_out_of_range_are_refused(flag):
    with pytest.raises(SystemExit):
        profile_step.main([flag])
