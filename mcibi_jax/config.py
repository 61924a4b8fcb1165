"""Loading experiment configs: ``configs/<dataset>.py:<backbone>`` plus dotted overrides."""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import ml_collections


class ConfigError(ValueError):
    """A config file, argument or override that cannot be used."""


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parent_of(
    config: ml_collections.ConfigDict, key: str
) -> tuple[ml_collections.ConfigDict, str]:
    """(the ConfigDict holding the dotted ``key``, its last part); ConfigError for an unknown key."""
    *parents, leaf = key.strip().split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} (in {key!r})")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = (
            ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
        )
        raise ConfigError(f"unknown config key {key.strip()!r}; keys here: {known}")
    return node, leaf


def apply_override(config: ml_collections.ConfigDict, dotted: str) -> None:
    """Applies ``a.b.c=value`` (value parsed as a Python literal, else kept as a string), for
    :func:`load_config` and the argparse command lines; ``python -m mcibi_jax.main`` and
    ``data.prepare`` take ``--config.a.b.c=value`` through ``ml_collections.config_flags``."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} is not of the form key=value")
    key, text = dotted.split("=", 1)
    node, leaf = _parent_of(config, key)
    value = _parse_value(text)
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(current)(value)
    try:
        node[leaf] = value
    except TypeError as error:
        raise ConfigError(f"override {dotted!r}: {error}") from None


def _one_line(error: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return (
        f"{type(error).__name__}: {text}"
        if not isinstance(error, (ValueError, ConfigError))
        else text
    )


def _missing_file(file: Path) -> ConfigError:
    """The error for a config path that is not a file, naming the config files next to it."""
    what = "is a directory, not a config file" if file.is_dir() else "does not exist"
    folder = file if file.is_dir() else file.parent
    found = (
        sorted(p.name for p in folder.glob("*.py") if not p.name.startswith("_"))
        if folder.is_dir()
        else []
    )
    close = difflib.get_close_matches(file.name, found, n=1) if not file.is_dir() else []
    hint = f"; did you mean {folder / close[0]}?" if close else ""
    listing = f" (config files in {folder}: {', '.join(found)})" if found else ""
    return ConfigError(f"config file {file} {what}{hint}{listing}")


def _positional(function: Any) -> tuple[bool, bool]:
    """(takes a positional argument, needs one) of ``get_config``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True, False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return bool(positional), any(
        p.default is p.empty and p.kind != p.VAR_POSITIONAL for p in positional
    )


def load_config(
    spec: str | os.PathLike, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """``load_config("configs/cityscapes.py:r50", ["model.num_classes=7"])``, locked: setting a
    key the config lacks is an error (``ConfigDict.lock``).

    Raises ConfigError, with a one-line message, for a missing or broken config file, an
    argument the file does not take (or lacks) and an unknown override key.
    """
    spec = str(spec)
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise _missing_file(file)
    module_spec = importlib.util.spec_from_file_location(f"_mcibi_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(
            f"{file}:{error.lineno}: syntax error in the config file: {error.msg}"
        ) from None
    except Exception as error:  # anything the file raises while it runs
        raise ConfigError(f"cannot load the config file {file}: {_one_line(error)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{file} has no get_config()")
    takes_arg, needs_arg = _positional(get_config)
    if arg and not takes_arg:
        raise ConfigError(f"{file} takes no argument (got {spec!r}); use {path} alone")
    if not arg and needs_arg:
        raise ConfigError(f"{file} needs an argument: {path}:<arg>")
    try:
        config = get_config(arg) if arg else get_config()
    except (
        Exception
    ) as error:  # e.g. the ValueError of an unknown backbone, which names the choices
        message = _one_line(error)
        raise ConfigError(message if message.startswith(spec) else f"{spec}: {message}") from None
    if isinstance(config, ml_collections.ConfigDict):
        config.lock()
    for override in overrides:
        apply_override(config, override)
    return config


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=V`` / ``--name V`` (the last one) in an absl command line, else None."""
    value = None
    for i, arg in enumerate(argv):
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                value = arg[len(prefix) + 1 :]
            elif arg == prefix and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def flags_error_message(error: Exception) -> str:
    """One line for an absl ``flags.Error`` (a missing required flag, an unknown flag, a bad value)."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    marker = " must have a value other than None"
    if marker in text:  # absl's "flag --x=None: Flag --x must have a value other than None."
        name = text.split(marker)[0].rsplit("Flag ", 1)[-1]
        return f"{name} is required (see --helpshort)"
    return f"{text} (see --helpshort)"


def parse_absl_command_line(
    argv: list[str], config_flag: Any, config_argv: list[str], flag_values: Any = None
) -> list[str]:
    """absl ``flags_parser`` of a program with a config-file flag (``--config``) and
    ``--config.<key>=<value>`` overrides, which ``ml_collections.config_flags`` applies.

    ``config_flag`` is the holder ``config_flags.DEFINE_config_file(..., sys_argv=config_argv)``
    returned (its config is locked). Command-line mistakes (a missing or broken config file, a
    wrong argument, an unknown key, a bad value, a missing or unknown flag) print one line and
    exit with status 2. ``flag_values``: where the flags are defined (default ``absl.flags.FLAGS``).
    """
    from absl import flags

    _register_list_parser()
    flag_values = flags.FLAGS if flag_values is None else flag_values
    try:
        spec = flag_value(argv, "config")
        if spec is not None:  # a broken file or unknown key: our one line, not a traceback
            config = load_config(spec)
            for key in override_keys(argv):
                _parent_of(config, key)
    except ConfigError as error:
        usage_error(error)
    config_argv[:] = argv
    try:
        remaining = flag_values(argv)
    except flags.Error as error:
        usage_error(flags_error_message(error))
    return remaining


def override_keys(argv: Sequence[str]) -> list[str]:
    """The keys of the ``--config.<key>[=<value>]`` arguments of a command line."""
    return [
        arg.split("config.", 1)[1].split("=", 1)[0]
        for arg in argv
        if arg.startswith(("--config.", "-config.", "--noconfig.", "-noconfig."))
    ]


def _register_list_parser() -> None:
    """Lets ``config_flags`` override list fields (``model.inference.multiscale=[0.5, 1.0]``),
    as it does tuples: the value is a Python literal list or tuple."""
    from absl import flags
    from ml_collections import config_flags

    class ListParser(flags.ArgumentParser):
        def parse(self, argument: Any) -> list:
            value = _parse_value(argument) if isinstance(argument, str) else argument
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"expected a list such as [1, 2], got {argument!r}")
            return list(value)

        def flag_type(self) -> str:
            return "list"

    config_flags.register_flag_parser_for_type(list, ListParser())


def usage_error(message: Any) -> NoReturn:
    """Prints ``error: message`` on stderr and exits with status 2 (a command-line mistake)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, ["a.b=value", ...]) of a command line with --config.a.b=value."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--config.", "-config.")):
            key = arg.split("config.", 1)[1]
            if "=" not in key:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
                key, i = f"{key}={argv[i + 1]}", i + 1
            overrides.append(key)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


class CommandLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one ``error: ...`` line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        usage_error(f"{message} (see {self.prog} --help)")


def config_overrides(parser: argparse.ArgumentParser, unparsed: list[str]) -> list[str]:
    """The ``--config.k=v`` overrides among what ``parser.parse_known_args`` left over; anything
    else (or an override without a value) is a usage error of ``parser``."""
    try:
        rest, overrides = split_overrides(list(unparsed))
    except ConfigError as error:
        parser.error(str(error))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return overrides


# The compute dtypes ``config.dtype`` may name (parameters, memory and statistics stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype_names(text: str) -> list[str]:
    """``"float32,bfloat16"`` -> ``["float32", "bfloat16"]`` (duplicates dropped); ConfigError for
    unknown names."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPUTE_DTYPES]
    if unknown or not names:
        what = f"unknown dtype(s) {', '.join(map(repr, unknown))}" if unknown else "no dtype given"
        raise ConfigError(f"{what}: expected a comma-separated list of {', '.join(COMPUTE_DTYPES)}")
    return list(dict.fromkeys(names))


def model_dtype(name: str) -> Any:
    """What ``build_model(..., dtype=)`` takes for a ``config.dtype`` name: None for float32."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(
            f"dtype={name!r} is not supported; choose one of {', '.join(COMPUTE_DTYPES)}"
        )
    import jax.numpy as jnp

    return None if name == "float32" else jnp.bfloat16
