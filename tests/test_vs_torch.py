"""Smoke test of benchmarks/vs_torch.py on a narrow R-50: it runs, and both sides compute the same logits."""

from __future__ import annotations

import re

import pytest

from tests.helpers import load_script

pytest.importorskip("torch", reason="needs the benchmark extra: pip install -e '.[bench]'")
vs_torch = load_script("benchmarks", "vs_torch")


def test_vs_torch_tiny_forward(capsys):
    vs_torch.main(
        ["--tiny", "--models=r50", "--tasks=forward", "--forward_size=32x32", "--repeats=1"]
    )
    out = capsys.readouterr().out
    assert re.search(
        r"\| R-50 \| forward 1x32x32 \| [\d.]+ s \| [\d.]+ s \| \*\*[\d.]+x\*\* \|", out
    ), out
    diff, scale = map(
        float, re.search(r"max \|ours - torch\| = (\S+) \(logits up to (\S+)\)", out).groups()
    )
    assert diff <= 1e-4 * max(scale, 1.0), out
