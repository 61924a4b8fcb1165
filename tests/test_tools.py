"""mcibi_jax.tools.count: parameter and FLOP counts."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from mcibi_jax.config import load_config
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.tools import count
from mcibi_jax.train.state import init_variables
from tests.reference_data import KEYS

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.py"


class Tiny(nn.Module):
    """conv 3x3 (3 -> 8, bias) and a 1x1 classifier (8 -> 4, bias): 224 + 36 parameters."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Conv(8, (3, 3), padding=1, name="stem")(x))
        return nn.Conv(4, (1, 1), name="classifier")(x)


def test_tiny_model_counts_by_hand():
    model = Tiny()
    variables = count._abstract_variables(model, (16, 16))
    params = count.count_parameters(variables["params"])
    assert params == {"stem": 3 * 3 * 3 * 8 + 8, "classifier": 8 * 4 + 4}
    flops = count.forward_flops(model, variables, (16, 16))
    # 2 FLOPs per multiply-add (XLA skips the zero padding of the 3x3 border windows)
    macs = 16 * 16 * (27 * 8 + 8 * 4)
    assert 0.9 * 2 * macs <= flops <= 1.1 * 2 * macs
    assert (
        3.8
        < count.forward_flops(model, count._abstract_variables(model, (32, 32)), (32, 32)) / flops
        < 4.3
    )


def test_demo_counts_match_the_initialised_tree():
    config = load_config(DEMO, [])
    counts = count.model_counts(config)
    assert counts["size"] == (64, 64)  # the demo's image size (it has no crop_size)
    model = build_model(config.model)
    variables = init_variables(model, jax.random.key(0, impl="rbg"), (64, 64))  # real arrays
    expected = {
        k: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v))
        for k, v in variables["params"].items()
    }
    assert counts["params"] == expected
    assert counts["total_params"] == sum(expected.values())
    assert {"backbone_net", "auxiliary_decoder", "memory_module", "decoder_stage2"} <= set(
        counts["params"]
    )
    assert counts["flops"] > 0
    bigger = count.model_counts(config, (128, 128))
    assert bigger["params"] == counts["params"]
    # ~4x; small maps pay fixed costs (pooling branch)
    assert 3.5 < bigger["flops"] / counts["flops"] < 5.0


def test_cli_prints_units(capsys):
    assert (
        count.main(["--config", str(DEMO), "--size=32x48", "--config.model.head.dropout=0.0"]) == 0
    )
    out = capsys.readouterr().out
    assert "backbone_net" in out and "total" in out and "32x48 image" in out and "M" in out
    assert count.parse_size("512x1024") == (512, 1024) and count.parse_size("64") == (64, 64)
    assert count.human(3.2e9) == "3.20G" and count.human(1_413_540) == "1.41M"


def test_eval_writes_the_confusion_matrix(tmp_path):
    from mcibi_jax.evaluation.confusion import read_csv
    from mcibi_jax.porting.variables import save_variables
    from mcibi_jax.train.experiment import run

    config = load_config(DEMO, ["dataset.image_size=(32, 32)", "dataset.test.num_images=8"])
    variables = init_variables(build_model(config.model), jax.random.key(0, impl="rbg"), (32, 32))
    save_variables(tmp_path / "checkpoints" / "final", variables)
    lines = []
    results = run(config, tmp_path, "eval", log=lines.append)
    names, counts = read_csv(tmp_path / "confusion.csv")
    assert names == ["background", "shape1", "shape2", "shape3"]
    assert counts.shape == (4, 4) and counts.sum() > 0
    # percent
    assert results["eval"]["aAcc"] == pytest.approx(100 * np.trace(counts) / counts.sum())
    assert (tmp_path / "confusion.png").is_file() and any("confusion" in line for line in lines)


def test_released_recipe_counts_the_released_parameters():
    keys = KEYS / "resnet50os8_cityscapes.txt"
    if not keys.is_file():
        pytest.skip(f"no {keys}")
    trainable = 0
    for line in keys.read_text().splitlines():
        name, shape = line.split("\t")[:2]
        if (
            "running_" in name
            or "num_batches_tracked" in name
            or name.endswith("memory_module.memory")
        ):
            continue  # buffers, and the memory (updated by the step, not by gradients)
        trainable += int(np.prod([int(s) for s in shape.strip("()[] ").split(",") if s.strip()]))
    config = load_config("configs/cityscapes.py:r50")
    params = count.count_parameters(
        count._abstract_variables(build_model(config.model), (64, 64))["params"]
    )
    assert sum(params.values()) == trainable == 91_209_113


def test_readme_port_example_states_the_counted_parameters():
    """The README's port line and python -m mcibi_jax.tools.count give one number (checked above
    against the released state_dict), for the same config."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line for line in readme.splitlines() if "ported " in line and " parameters" in line]
    assert lines and all("91,209,113 parameters in 243 arrays" in line for line in lines), lines
