"""Interrupted training resumes exactly: train state, memory and the input pipeline's position."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from mcibi_jax.config import ConfigError
from mcibi_jax.porting.variables import load_variables
from mcibi_jax.train.experiment import run
from tests.helpers import tiny_ade20k_config, write_ade20k


def _train(config, workdir):
    lines = []
    results = run(config, workdir, mode="train", log=lines.append)
    return results, lines


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    write_ade20k(tmp_path / "ade")
    config = tiny_ade20k_config(tmp_path / "ade")
    config.train.num_epochs = 3
    straight, _ = _train(config, tmp_path / "a")

    shutil.copytree(tmp_path / "a", tmp_path / "b")  # a second run would write the same files
    steps = sorted(
        int(p.name) for p in (tmp_path / "b" / "train_state").iterdir() if p.name.isdigit()
    )
    assert steps == [1, 2, 3]  # one checkpoint per epoch (one step each here)
    shutil.rmtree(tmp_path / "b" / "train_state" / "3")  # as if the run died during epoch 3
    shutil.rmtree(tmp_path / "b" / "checkpoints")
    resumed, lines = _train(config, tmp_path / "b")
    assert any("resuming from" in line and "step 2" in line for line in lines)

    a = load_variables(straight["checkpoint"], config)
    b = load_variables(resumed["checkpoint"], config)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_finished_run_is_not_trained_again(tmp_path):
    write_ade20k(tmp_path / "ade")
    config = tiny_ade20k_config(tmp_path / "ade")
    _train(config, tmp_path / "w")
    results, lines = _train(config, tmp_path / "w")
    assert any("already trained" in line for line in lines)
    assert results["train"]["steps"] == 2


def test_incompatible_checkpoint_in_workdir_is_a_clear_error(tmp_path):
    write_ade20k(tmp_path / "ade")
    config = tiny_ade20k_config(tmp_path / "ade")
    _train(config, tmp_path / "w")
    saved_config = (tmp_path / "w" / "config.json").read_text()
    config.model.head.feats_channels = 24
    try:
        _train(config, tmp_path / "w")
    except ConfigError as error:
        assert "does not fit this config" in str(error) and "--workdir" in str(error)
        assert "strict=False" not in str(error) and "v1 API" not in str(error)  # orbax's advice
    else:
        raise AssertionError("expected a ConfigError")
    # the workdir still says what it holds
    assert (tmp_path / "w" / "config.json").read_text() == saved_config
    assert sorted(
        p.name for p in (tmp_path / "w" / "train_state").iterdir() if p.name.isdigit()
    ) == ["1", "2"]


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    from mcibi_jax import load_config
    from tests.helpers import DEMO_CONFIG, DEMO_FAST

    config = load_config(DEMO_CONFIG, DEMO_FAST + ["train.num_epochs=1"])
    first = run(config, tmp_path / "a", mode="train", log=lambda _: None)
    tuned = load_config(
        DEMO_CONFIG,
        DEMO_FAST
        + [
            "train.num_epochs=1",
            "train.optimizer.lr=0.0",
            "train.schedule.min_lr=0.0",
            "train.optimizer.weight_decay=0.0",
            f"train.init_from={first['checkpoint']!r}",
        ],
    )
    lines = []
    second = run(tuned, tmp_path / "b", mode="train", log=lines.append)
    assert any(line.startswith("initialised from") for line in lines)
    before, after = (
        load_variables(first["checkpoint"], config),
        load_variables(second["checkpoint"], config),
    )
    for x, y in zip(
        jax.tree_util.tree_leaves(before["params"]), jax.tree_util.tree_leaves(after["params"])
    ):
        # lr 0: the weights stay the loaded ones
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    tuned.model.head.feats_channels = 24
    try:
        run(tuned, tmp_path / "c", mode="train", log=lambda _: None)
    except ConfigError as error:
        assert "train.init_from" in str(error)
    else:
        raise AssertionError("expected a ConfigError")


def test_resumed_run_reports_the_whole_run_once(tmp_path):
    import json

    from mcibi_jax import load_config
    from tests.helpers import DEMO_CONFIG, DEMO_FAST

    def records():
        return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    config = load_config(DEMO_CONFIG, DEMO_FAST + ["train.eval_every=3"])
    first = run(config, tmp_path, mode="train", log=lambda _: None)["train"]
    shutil.rmtree(tmp_path / "train_state" / "24")  # as if the run died during epoch 3
    shutil.rmtree(tmp_path / "checkpoints" / "final")
    resumed = run(config, tmp_path, mode="train", log=lambda _: None)["train"]
    # already trained: evaluates
    again = run(config, tmp_path, mode="train_and_eval", log=lambda _: None)

    for results in (
        resumed,
        again["train"],
        json.loads((tmp_path / "results.json").read_text())["train"],
    ):
        assert [h["step"] for h in results["history"]] == [4, 8, 12, 16, 20, 24]
        assert results["first_loss"] == first["first_loss"] == first["history"][0]["loss"]
        for a, b in zip(results["history"], first["history"]):  # an exact resume: the same values
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    saved = records()
    assert sum("hparams" in r for r in saved) == 1  # not once per launch
    assert [r["step"] for r in saved if "loss" in r] == [4, 8, 12, 16, 20, 24]  # no step twice
    assert [r["step"] for r in saved if "eval/mIoU" in r] == [24]
    assert saved[-1]["eval/mIoU"] == pytest.approx(again["eval"]["mIoU"])

    config.train.optimizer.lr = 0.01  # changed settings are recorded
    run(config, tmp_path, mode="train", log=lambda _: None)
    assert sum("hparams" in r for r in records()) == 2


def test_checkpoint_past_the_schedule_is_not_taken_for_a_finished_run(tmp_path):
    """A run resumed with fewer steps in its schedule (another batch size or fewer epochs) used
    to say "already trained" and export the unfinished weights as final."""
    write_ade20k(tmp_path / "ade")
    config = tiny_ade20k_config(tmp_path / "ade")
    config.train.num_epochs = 3
    _train(config, tmp_path / "w")
    shutil.rmtree(tmp_path / "w" / "checkpoints")
    config.train.num_epochs = 2
    with pytest.raises(ConfigError, match="is at step 3, past this config's 2 steps"):
        _train(config, tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_synthetic_stream_refuses_another_batch_size():
    from mcibi_jax.data.synthetic import SyntheticTraining
    from mcibi_jax.sharding import data_mesh

    images, labels = np.zeros((8, 4, 4, 3), np.float32), np.zeros((8, 4, 4), np.int32)

    def stream(batch_size):
        return SyntheticTraining(images, labels, batch_size, data_mesh(), seed=0, flip_prob=0.5)

    saved = stream(4).state()
    stream(4).restore(saved)
    stream(4).restore({})  # checkpoints written before the stream saved anything
    with pytest.raises(ConfigError, match="batch_size 4 \\(now 2\\)"):
        stream(2).restore(saved)
