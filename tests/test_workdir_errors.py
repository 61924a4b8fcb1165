"""A work folder that cannot be written, and files that cannot be written during a run: one
line each, and an evaluation's scores are shown before anything is written."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from mcibi_jax.config import ConfigError
from mcibi_jax.train import experiment


def test_workdir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file; give a folder"):
        experiment._work_folder(tmp_path / "file")

    def unwritable(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "TemporaryFile", unwritable)
    with pytest.raises(ConfigError, match="cannot write there \\(Read-only file system\\)"):
        experiment._work_folder(tmp_path / "new")


def test_an_unwritable_file_during_the_run_is_one_line(monkeypatch, capsys):
    def run(*args, **kwargs):
        raise OSError(30, "Read-only file system", "/runs/a/confusion.csv")

    monkeypatch.setattr(experiment, "run", run)
    with pytest.raises(SystemExit) as stopped:
        experiment.main(None, "/runs/a", "eval")
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "error: Read-only file system: /runs/a/confusion.csv\n"


def test_scores_are_logged_before_the_confusion_matrix_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "confusion_counts", lambda *a, **k: np.eye(2, dtype=np.int64))
    monkeypatch.setattr(experiment, "evaluation_options", lambda config: {})

    def cannot_write(*args):
        raise OSError(28, "No space left on device", str(tmp_path / "confusion.csv"))

    monkeypatch.setattr(experiment, "save_confusion", cannot_write)

    class Data:
        def evaluation(self):
            return [], 2, ["a", "b"]

    config = {
        "dataset": {"num_classes": 2, "ignore_label": 255, "eval_set": "val"},
        "eval": {"save_confusion": True},
    }
    lines = []
    with pytest.raises(OSError, match="No space left"):
        experiment.evaluate_variables(None, {}, Data(), config, tmp_path, lines.append)
    assert any("mIoU" in line for line in lines)
