"""User mistakes the tools catch up front, before any model loads: one ``error: ...`` line and
exit status 2 (data.prepare, export, serve, predict), help that lists each program's own flags,
and tuple overrides of the wrong length."""

from __future__ import annotations

import errno
import importlib.util
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from absl import flags
from PIL import Image

from mcibi_jax import export, predict, serve
from mcibi_jax.command_line import CommandLine
from mcibi_jax.data import prepare
from mcibi_jax.data.datasets import DatasetConfigError
from tests.test_cli_errors import _assert_one_line, _in_process, _run

DEMO = "--config=configs/demo.py"


def _missing(monkeypatch, *names: str) -> None:
    """Makes ``importlib.util.find_spec`` report ``names`` as not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in names else find_spec(name, *a)
    )


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the check")


def test_prepare_checks_up_front(tmp_path, monkeypatch):
    with pytest.raises(DatasetConfigError, match="generated in memory .* needs no preparing"):
        prepare.prepare({"name": "synthetic"}, tmp_path / "records")
    _missing(monkeypatch, "tensorflow_datasets")
    with pytest.raises(
        DatasetConfigError, match=r'tensorflow_datasets.*pip install -e "\.\[tfds\]"'
    ):
        prepare.prepare({"name": "ade20k", "root": str(tmp_path)}, tmp_path / "records")
    assert not (tmp_path / "records").exists()


def test_export_checks_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "load_segmenter", _no_model)
    args = [DEMO, f"--pth={tmp_path / 'x.pth'}", f"--out={tmp_path / 'out'}"]
    _assert_one_line(
        *_in_process(export.main, [*args, "--platforms=cpu,gpu"], capsys),
        "unknown platform 'gpu' (gpu: cuda for NVIDIA, rocm for AMD); choose from cpu, cuda",
    )
    with pytest.raises(export.ConfigError, match="'foo'"):
        export.parse_platforms(["foo"])
    assert export.parse_platforms([" CPU", "cuda", ""]) == ["cpu", "cuda"]
    assert export.parse_platforms(None) is None
    _missing(monkeypatch, "flatbuffers")
    _assert_one_line(
        *_in_process(export.main, args, capsys), 'flatbuffers package: pip install -e ".[export]"'
    )
    assert not (tmp_path / "out").exists()


def test_serve_port_checked_before_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve, "load_service", _no_model)
    args = [DEMO, f"--pth={tmp_path / 'x.pth'}"]
    _assert_one_line(
        *_in_process(serve.main, [*args, "--port=99999"], capsys), "not an integer in the range"
    )
    with pytest.raises(serve.ConfigError, match="0..65535"):
        serve.bind("127.0.0.1", 70000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _assert_one_line(
            *_in_process(serve.main, [*args, f"--port={port}"], capsys),
            f"cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port",
        )


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 6)).save(folder / "a.png")
    return folder


def test_predict_checkpoint_file(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.setattr(predict, "load_segmenter", _no_model)
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"not a checkpoint folder")
    args = [DEMO, f"--checkpoint={weights}", f"--input={image_folder}"]
    _assert_one_line(
        *_in_process(predict.main, [*args, f"--output={tmp_path / 'out'}"], capsys),
        "--checkpoint takes a checkpoint folder (orbax), not the file "
        f"{weights}; for a released .pth file use --pth=FILE",
    )


def test_predict_output_checked_before_the_model(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.setattr(predict, "load_segmenter", _no_model)
    weights = tmp_path / "x.pth"
    weights.write_bytes(b"")
    args = [DEMO, f"--pth={weights}", f"--input={image_folder}"]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _assert_one_line(
        *_in_process(predict.main, [*args, f"--output={a_file / 'masks'}"], capsys),
        "is a file, not a folder",
    )

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(predict.tempfile, "NamedTemporaryFile", read_only)
    out = tmp_path / "out"
    for output in (tmp_path, out / "masks"):  # an existing folder, and one to be created
        _assert_one_line(
            *_in_process(predict.main, [*args, f"--output={output}"], capsys),
            f"--output {output}: cannot write into {tmp_path} (Read-only file system); "
            "choose another --output",
        )
    assert not out.exists()


def test_predict_tta_without_tta_settings(tmp_path, image_folder, monkeypatch, capsys):
    weights = tmp_path / "x.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(
        predict, "load_segmenter", lambda *a, **k: (_ for _ in ()).throw(OSError("stop"))
    )
    args = [DEMO, f"--pth={weights}", f"--input={image_folder}", f"--output={tmp_path / 'o'}"]
    code, err = _in_process(predict.main, [*args, "--tta"], capsys)
    assert code == 2 and err.splitlines() == [
        "warning: --tta has no effect: the config has no eval.tta_* settings; "
        "using model.inference",
        "error: stop",
    ], err
    assert _in_process(predict.main, args, capsys) == (2, "error: stop\n")  # no --tta: no warning
    released = ["--config=configs/ade20k.py:r50", *args[1:], "--tta"]
    assert _in_process(predict.main, released, capsys) == (2, "error: stop\n")  # has tta_*


def test_help_lists_the_programs_own_flags(capsys):
    values = flags.FlagValues()
    flags.DEFINE_integer("verbosity", 0, "a library's flag", flag_values=values)
    command = CommandLine("prog", "doc", config="config", flag_values=values)
    flags.DEFINE_string("workdir", None, "where it goes", flag_values=values)
    flags.DEFINE_bool("force", False, "again", flag_values=values)
    flags.mark_flags_as_required(["workdir"], flag_values=values)
    with pytest.raises(SystemExit):
        command.parse(["--help"])
    out = capsys.readouterr().out
    assert "verbosity" not in out and "--helpfull lists absl's flags too" in out, out
    assert "  --workdir: where it goes\n    (required)\n" in out, out
    assert "  --[no]force: again\n    (default: 'false')\n  --workdir" in out, out
    assert "--config: config\n    (default: 'None')\n    (required)" in out, out
    with pytest.raises(SystemExit):
        command.parse(["--helpfull"])
    assert "--verbosity: a library's flag" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, expected",
    [
        ("dataset.image_size=64", "takes 2 values, got 1: (64,); e.g. "),
        ("dataset.image_size=(32,)", '--config.dataset.image_size="(64, 64)"'),
        ("dataset.mean=(1, 2)", '--config.dataset.mean="(127.5, 127.5, 127.5)"'),
    ],
)
def test_tuple_override_of_the_wrong_length(override, expected, capsys):
    def parse(*args: str) -> CommandLine:
        command = CommandLine("prog", "doc", config="config")
        command.parse([DEMO, *args])
        return command

    with pytest.raises(SystemExit) as exit_:
        parse(f"--config.{override}")
    _assert_one_line(exit_.value.code, capsys.readouterr().err, expected)
    config = parse(
        "--config.dataset.image_size=[32, 48]",
        "--config.model.backbone.selected_indices=(3,)",  # of free length
        "--config.dataset.train.flip_label_pairs=((1, 2),)",
    ).config
    assert config.dataset.image_size == (32, 48) and config.model.backbone.selected_indices == (3,)


def test_programs(tmp_path):
    """The real ``python -m`` programs: absl's flags left to --helpfull, no runpy warning."""
    records, work = tmp_path / "records", tmp_path / "work"
    cases = {
        "prepare": ("mcibi_jax.data.prepare", [DEMO, f"--data_dir={records}"]),
        "prepare_help": ("mcibi_jax.data.prepare", ["--help"]),
        "main_help": ("mcibi_jax.main", ["--help"]),
        "main_helpfull": ("mcibi_jax.main", ["--helpfull"]),
        "main_size": (
            "mcibi_jax.main",
            [DEMO, f"--workdir={work}", "--config.dataset.image_size=64"],
        ),
        "pretrained": ("mcibi_jax.pretrained", ["--help"]),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(lambda case: _run(*case), cases.values())))
    for name, result in results.items():
        assert "Warning" not in result.stderr, (name, result.stderr)
    prepare_error = results["prepare"]
    _assert_one_line(prepare_error.returncode, prepare_error.stderr, "needs no preparing")
    size_error = results["main_size"]
    _assert_one_line(size_error.returncode, size_error.stderr, "image_size takes 2 values")
    assert not records.exists() and not work.exists()
    prepare_help = results["prepare_help"].stdout
    assert "--data_dir=DIR \\\n        [--config.dataset.root" in prepare_help, prepare_help
    main_help = results["main_help"].stdout
    assert "--workdir: directory for checkpoints and results\n    (required)" in main_help
    assert "pdb" not in main_help and "verbosity" not in main_help, main_help
    assert "--[no]pdb_post_mortem" in results["main_helpfull"].stdout
    assert results["pretrained"].returncode == 0 and results["pretrained"].stderr == ""
