"""Smoke tests of benchmarks/train_step.py, forward.py, bf16_fidelity.py and checkpoint_save.py
on a tiny demo model."""

from __future__ import annotations

import os
import re
import textwrap

import jax
import pytest

from tests.helpers import REPO, load_script

train_step = load_script("benchmarks", "train_step")
forward = load_script("benchmarks", "forward")
bf16_fidelity = load_script("benchmarks", "bf16_fidelity")
checkpoint_save = load_script("benchmarks", "checkpoint_save")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    """configs/demo.py without the auxiliary head, memory loss and context branches (faster
    compiles), with a recipe per-device batch of 2 // 2 = 1."""
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(
        textwrap.dedent(f"""
        from mcibi_jax.config import load_config


        def get_config():
            config = load_config({str(REPO / "configs" / "demo.py")!r})
            config.model.auxiliary = []
            config.model.loss_weights.aux = []
            config.model.head.use_memory_loss = False
            config.model.head.context_dilations = []
            config.train.batch_size = 2
            config.train.num_replicas = 2
            return config
        """)
    )
    return str(path)


def _rows(out: str) -> list[str]:
    lines = out.strip().splitlines()
    assert lines[0].startswith("device: ")
    return lines[1:]


def test_train_step_reports_both_dtypes_at_the_recipe_per_device_batch(tiny_config, capsys):
    train_step.main([f"--configs={tiny_config}", "--size=32x32", "--iters=1"])
    rows = _rows(capsys.readouterr().out)
    assert [row.split()[1] for row in rows] == ["float32", "bfloat16"]
    n = jax.device_count()
    for row in rows:
        assert row.startswith(tiny_config)
        assert " 1/device  " in row and f" {n}x32x32 " in row, row
        assert re.search(r"\d+\.\d+ images/s", row), row
        memory = (
            "peak memory "
            if train_step.peak_memory(jax.devices()[0]) is not None
            else "host peak RSS +"
        )
        assert re.search(re.escape(memory) + r"\d+\.\d\d GiB", row), row
        assert "nan" not in row


def test_forward_reports_both_dtypes(tiny_config, capsys):
    forward.main([f"--configs={tiny_config}", "--size=32x32", "--iters=1"])
    rows = _rows(capsys.readouterr().out)
    assert [row.split()[1] for row in rows] == ["float32", "bfloat16"]
    for row in rows:
        assert row.split()[2] == "1x32x32" and re.search(r"\d+\.\d+ images/s$", row), row


@pytest.mark.parametrize("module", [train_step, forward], ids=["train_step", "forward"])
def test_dtype_options(module, monkeypatch, capsys):
    calls = []

    def fake_benchmark(spec, iters, batch, size, dtype_name, overrides=()):
        calls.append((spec, dtype_name, batch, list(overrides)))
        return {
            "config": spec,
            "dtype": dtype_name,
            "per_device_batch": batch or 3,
            "batch": batch or 3,
            "size": (8, 8) if module is train_step else "1x8x8",
            "compile_s": 0.0,
            "step_s": 0.1,
            "images_per_s": 1.0,
            "init_s": 0.0,
            "loss": 1.0,
            "peak_bytes": 2**30,
            "host_rss_growth_bytes": 0,
        }

    monkeypatch.setattr(module, "benchmark", fake_benchmark)
    module.main(["--configs=a.py,b.py", "--dtype=bfloat16"])  # the old single-dtype option
    assert [c[:2] for c in calls] == [("a.py", "bfloat16"), ("b.py", "bfloat16")]
    calls.clear()
    module.main(["--configs=a.py", "--dtypes=bfloat16, float32,bfloat16"])
    assert [c[1] for c in calls] == ["bfloat16", "float32"]
    calls.clear()
    module.main(["--configs=a.py"])
    assert [c[1] for c in calls] == ["float32", "bfloat16"]
    if module is train_step:
        assert all(c[2] is None for c in calls)  # None: each recipe's per-device batch
        assert all(c[3] == [] for c in calls)
    lines = capsys.readouterr().out.splitlines()
    assert sum(not line.startswith("device: ") for line in lines) == 2 + 2 + 2
    if module is train_step:  # config overrides reach every config's step
        calls.clear()
        module.main(["--configs=a.py,b.py", "--dtypes=float32", "--set=x.y=1", "--set=z=False"])
        assert [c[3] for c in calls] == [["x.y=1", "z=False"]] * 2
        capsys.readouterr()
    for bad in ["--dtypes=float16", "--dtypes=", "--dtype=float32,fp8"]:
        with pytest.raises(SystemExit):
            module.main(["--configs=a.py", bad])
        assert "expected a comma-separated list of float32, bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, per_device",
    [
        ("configs/cityscapes.py:r50", 2),
        ("configs/lip.py:s101", 5),
        ("configs/cocostuff10k.py:s101", 4),
        ("configs/demo.py", 8),
    ],
)
def test_recipe_per_device_batch(spec, per_device):
    config = train_step.mcibi_jax.load_config(REPO / spec)
    assert train_step.recipe_per_device_batch(config.train.to_dict()) == per_device


def test_format_memory():
    assert train_step.format_memory({"peak_bytes": 3 * 2**29}) == "peak memory 1.50 GiB"
    assert (
        train_step.format_memory({"peak_bytes": None, "host_rss_growth_bytes": 2**29})
        == "host peak RSS +0.50 GiB"
    )


def test_bf16_fidelity_reports_losses_logits_and_gradients(tiny_config, capsys):
    bf16_fidelity.main(
        [f"--config={tiny_config}", "--set=dataset.image_size=(32, 32)", "--worst=2"]
    )
    lines = _rows(capsys.readouterr().out)
    assert lines[0].startswith("loss        float32 ") and " bfloat16 " in lines[0]
    agreement = float(re.search(r"argmax agreement ([0-9.]+) %", lines[1]).group(1))
    assert 50.0 <= agreement <= 100.0
    cosine = float(re.search(r"gradients   cosine (-?[0-9.]+)", lines[2]).group(1))
    assert -1.0 <= cosine <= 1.0
    assert len(lines) == 3 + 2 and all(line.startswith("  cosine ") for line in lines[3:])


def test_checkpoint_save_reports_each_save(capsys):
    assert checkpoint_save.main(["--configs", str(REPO / "configs" / "demo.py"), "--saves=2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "1 process(es), 1 cpu device(s), replica-parallel writes off"
    assert len(lines) == 3
    for index, line in enumerate(lines[1:], 1):
        assert re.search(
            rf"demo.py: \d+ arrays, [\d.]+ MiB; save {index}: held the step [\d.]+ s, "
            r"on disk after [\d.]+ s$",
            line,
        ), line


def test_model_flops_count_the_model_not_the_faster_paths(tiny_config, monkeypatch):
    """MFU's numerator: the sub-grid kernel gradients (which convolve padding) and attention in
    chunks (recomputed in the backward pass) add FLOPs to the traced step; the model's count
    is that of XLA's dilated convs and unchunked attention, whatever the environment says."""
    import xla_stats

    def traced_flops(case):
        return xla_stats.jaxpr_flops(case.step.trace(*case.abstract_inputs()).jaxpr)

    monkeypatch.setenv("MCIBI_DILATED_CONV", "xla")
    monkeypatch.setenv("MCIBI_ATTENTION_CHUNK_ELEMENTS", "0")
    plain = train_step.train_case(tiny_config, 1, (64, 64), "float32", 10)
    plain_flops = traced_flops(plain)  # the environment is read when the step is traced
    monkeypatch.setenv("MCIBI_DILATED_CONV", "subgrid_grad")
    monkeypatch.setenv("MCIBI_ATTENTION_CHUNK_ELEMENTS", "16")
    faster = train_step.train_case(tiny_config, 1, (64, 64), "float32", 10)
    assert traced_flops(faster) > plain_flops
    assert faster.model_flops() == plain.model_flops() == plain_flops
    assert os.environ["MCIBI_DILATED_CONV"] == "subgrid_grad"  # restored
    assert os.environ["MCIBI_ATTENTION_CHUNK_ELEMENTS"] == "16"
    # nor what rematerialisation recomputes
    remat = train_step.train_case(
        tiny_config,
        1,
        (64, 64),
        "float32",
        10,
        overrides=["model.backbone.remat=True", "model.head.remat=True"],
    )
    assert traced_flops(remat) > traced_flops(faster)
    assert remat.model_flops() == plain_flops
