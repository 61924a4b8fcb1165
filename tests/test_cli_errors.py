"""Config-file and argument mistakes: one ``error: ...`` line and exit status 2 in every command
line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from absl import flags

from mcibi_jax import export, port, predict, pretrained, serve
from mcibi_jax.command_line import CommandLine
from mcibi_jax.config import ConfigError, load_config
from mcibi_jax.data import inspect as inspect_cli
from mcibi_jax.tools import count

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broken_configs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("configs")
    files = {
        "syntax": "def get_config():\n    return {'a': 1\n",
        "import": "import no_such_module_here\n\ndef get_config():\n    return {}\n",
        "no_get_config": "CONFIG = {}\n",
        "needs_arg": "import ml_collections\n\ndef get_config(arg):\n    return ml_collections.ConfigDict({'a': arg})\n",
        "raises": "def get_config():\n    raise KeyError('model')\n",
    }
    for name, text in files.items():
        (folder / f"{name}.py").write_text(text)
    return {name: folder / f"{name}.py" for name in files}


def _message(spec: str) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(spec)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_load_config_messages(broken_configs):
    message = _message("configs/dmeo.py")
    assert "config file configs/dmeo.py does not exist; did you mean configs/demo.py?" in message
    assert "cityscapes.py" in message and "custom_template.py" in message  # the files there
    assert "is a directory" in _message("configs")
    assert _message("configs/cityscapes.py:r5").endswith(
        "backbones for cityscapes: r50, r101, s101, hrnet48"
    )
    assert "vitl" in _message("configs/ade20k.py:r5")
    assert _message("configs/custom_template.py:r5").count("configs/custom_template.py:r5") == 1
    assert "configs/demo.py takes no argument (got 'configs/demo.py:r50')" in _message(
        "configs/demo.py:r50"
    )
    syntax = broken_configs["syntax"]
    assert _message(str(syntax)).startswith(f"{syntax}:")  # file:line
    assert "syntax error in the config file" in _message(str(syntax))
    assert "ModuleNotFoundError: No module named 'no_such_module_here'" in _message(
        str(broken_configs["import"])
    )
    assert "has no get_config()" in _message(str(broken_configs["no_get_config"]))
    assert "needs an argument" in _message(str(broken_configs["needs_arg"]))
    assert load_config(f"{broken_configs['needs_arg']}:x").a == "x"
    assert _message(str(broken_configs["raises"])).endswith("raises.py: KeyError: 'model'")


def _mistakes(broken: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """name -> (--config value, what the message must contain)."""
    return {
        "path": ("configs/dmeo.py", "did you mean configs/demo.py?"),
        "backbone": (
            "configs/cityscapes.py:r5",
            "backbones for cityscapes: r50, r101, s101, hrnet48",
        ),
        "extra_arg": ("configs/demo.py:r50", "configs/demo.py takes no argument"),
        "syntax": (str(broken["syntax"]), "syntax error in the config file"),
    }


def _assert_one_line(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def _in_process(main, argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


PROGRAMS = {
    "port": port.main,
    "predict": predict.main,
    "inspect": inspect_cli.main,
    "count": count.main,
    "export": export.main,
    "serve": serve.main,
}


def _required(program: str, tmp_path: Path) -> list[str]:
    """The flags besides --config each program needs to get past its command line."""
    return {
        "port": [f"--pth={tmp_path / 'x.pth'}", f"--out={tmp_path / 'out'}"],
        "predict": [
            f"--pth={tmp_path / 'x.pth'}",
            f"--input={tmp_path}",
            f"--output={tmp_path / 'out'}",
        ],
        "inspect": ["--quiet"],
        "count": [],
        "export": [f"--pth={tmp_path / 'x.pth'}", f"--out={tmp_path / 'out'}"],
        "serve": [f"--pth={tmp_path / 'x.pth'}", "--port=0"],
    }[program]


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_command_lines(program, broken_configs, tmp_path, capsys):
    main, extra = PROGRAMS[program], _required(program, tmp_path)
    for spec, expected in _mistakes(broken_configs).values():
        _assert_one_line(*_in_process(main, [f"--config={spec}", *extra], capsys), expected)
    _assert_one_line(*_in_process(main, extra, capsys), "--config is required")
    demo = "--config=configs/demo.py"
    _assert_one_line(
        *_in_process(main, [demo, *extra, "--bogus"], capsys), "Unknown command line flag 'bogus'"
    )
    _assert_one_line(
        *_in_process(main, [demo, *extra, "--config.train.no_such_key=1"], capsys),
        "unknown config key 'train.no_such_key'",
    )
    _assert_one_line(
        *_in_process(main, [demo, *extra, "--config.train.seed"], capsys),
        "Missing value for flag --config.train.seed",
    )
    _assert_one_line(
        *_in_process(main, [demo, *extra, "--config.train.seed=x"], capsys),
        "flag --config.train.seed=x: invalid literal for int()",
    )
    _assert_one_line(*_in_process(main, [demo, *extra, "stray"], capsys), "unexpected arguments")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("program", [*PROGRAMS, "pretrained"])
@pytest.mark.parametrize("flag", ["--help", "-h", "--helpshort"])
def test_help(program, flag, capsys):
    main = pretrained.main if program == "pretrained" else PROGRAMS[program]
    try:
        code = main([flag])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    module = main.__module__
    assert out.startswith(sys.modules[module].__doc__.strip().splitlines()[0]), out
    if program != "pretrained":
        assert "--config:" in out and "--config.<key>=<value>" in out


def test_pretrained_command_line(capsys):
    _assert_one_line(*_in_process(pretrained.main, ["--bogus"], capsys), "'bogus'")
    _assert_one_line(
        *_in_process(pretrained.main, ["--config.train.seed=1"], capsys), "'config.train.seed'"
    )
    _assert_one_line(
        *_in_process(pretrained.main, ["no:such"], capsys), "no released checkpoint 'no:such'"
    )


@pytest.mark.parametrize("program", ["port", "predict", "export", "serve"])
def test_exclusive_weight_flags(program, tmp_path, capsys):
    extra = [a for a in _required(program, tmp_path) if not a.startswith("--pth")]
    demo = "--config=configs/demo.py"
    both = [f"--pth={tmp_path / 'x.pth'}", "--pretrained=ade20k:r50"]
    _assert_one_line(
        *_in_process(PROGRAMS[program], [demo, *extra, *both], capsys),
        "--pth and --pretrained exclude each other",
    )
    _assert_one_line(*_in_process(PROGRAMS[program], [demo, *extra], capsys), "--pth")


def test_pretrained_name_stands_for_its_config(tmp_path, capsys):
    """--pretrained without --config: the release's recipe, with the overrides checked on it."""
    spec = pretrained.get("ade20k:r50").config_spec()
    assert spec.endswith("ade20k.py:r50") and Path(spec.rsplit(":", 1)[0]).is_file()
    command = CommandLine("prog", "doc", config="config")
    flags.DEFINE_string("pretrained", None, "name", flag_values=command.flags)
    command.parse(
        ["--pretrained=ade20k:r50", "--config.model.num_classes=7"], pretrained_config=True
    )
    assert command.config.model.num_classes == 7 and command.config.dataset.name == "ade20k"
    out = [f"--out={tmp_path / 'out'}"]
    _assert_one_line(
        *_in_process(port.main, ["--pretrained=ade20k:r50", *out, "--config.nope=1"], capsys),
        "unknown config key 'nope'",
    )
    _assert_one_line(
        *_in_process(port.main, ["--pretrained=ade20k:r5", *out], capsys),
        "no released checkpoint 'ade20k:r5'",
    )


def test_absl_command_line_parser(broken_configs, capsys):
    """CommandLine on flags like main's (python -m mcibi_jax.main passes absl.flags.FLAGS)."""

    def parse(*args: str) -> tuple[int, str]:
        command = CommandLine("prog", "doc", config="config")
        flags.DEFINE_string("workdir", None, "workdir", flag_values=command.flags)
        flags.DEFINE_enum("mode", "train", ["train", "eval"], "mode", flag_values=command.flags)
        flags.mark_flags_as_required(["workdir"], flag_values=command.flags)
        try:
            command.parse(list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        return code, capsys.readouterr().err

    for spec, expected in _mistakes(broken_configs).values():
        _assert_one_line(*parse(f"--config={spec}", "--workdir=w"), expected)
    _assert_one_line(
        *parse("--config", "configs/dmeo.py", "--workdir=w"), "configs/dmeo.py does not exist"
    )
    _assert_one_line(*parse("--workdir=w"), "--config is required")
    _assert_one_line(*parse("--config=configs/demo.py"), "--workdir is required")
    _assert_one_line(
        *parse("--config=configs/demo.py", "--workdir=w", "--mode=tain"), "flag --mode=tain"
    )
    _assert_one_line(
        *parse("--config=configs/demo.py", "--workdir=w", "--bogus=1"),
        "Unknown command line flag 'bogus'",
    )
    _assert_one_line(
        *parse("--config=configs/demo.py", "--workdir=w", "--config.train.no_such_key=1"),
        "unknown config key 'train.no_such_key'",
    )
    _assert_one_line(
        *parse("--config=configs/demo.py", "--workdir=w", "--config.train.seed"),
        "Missing value for flag --config.train.seed",
    )
    _assert_one_line(
        *parse("--config=configs/demo.py", "--workdir=w", "--config.train.seed=x"),
        "flag --config.train.seed=x: invalid literal for int()",
    )
    assert parse("--config=configs/demo.py", "--workdir=w", "--config.train.seed=3") == (0, "")


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_absl_programs(tmp_path):
    """The real ``python -m mcibi_jax.main`` and ``python -m mcibi_jax.data.prepare``."""
    workdir, data_dir = f"--workdir={tmp_path / 'work'}", f"--data_dir={tmp_path / 'records'}"
    cases = [
        (
            "mcibi_jax.main",
            ["--config=configs/cityscapes.py:r5", workdir],
            "backbones for cityscapes",
        ),
        ("mcibi_jax.main", ["--config=configs/demo.py"], "--workdir is required"),
        (
            "mcibi_jax.data.prepare",
            ["--config=configs/dmeo.py", data_dir],
            "did you mean configs/demo.py?",
        ),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda case: _run(case[0], case[1]), cases))
    for (_, _, expected), result in zip(cases, results):
        _assert_one_line(result.returncode, result.stderr, expected)
    assert not (tmp_path / "work").exists() and not (tmp_path / "records").exists()
