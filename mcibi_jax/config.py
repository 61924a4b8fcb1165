"""Loading experiment configs: ``configs/<dataset>.py:<backbone>`` plus dotted overrides."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections


class ConfigError(ValueError):
    """A config file, argument or override that cannot be used."""


def parse_value(text: str) -> Any:
    """A Python literal, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parent_of(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
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
    :func:`load_config`; the command lines take ``--config.a.b.c=value`` through
    ``ml_collections.config_flags`` (see :mod:`mcibi_jax.command_line`)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} is not of the form key=value")
    key, text = dotted.split("=", 1)
    node, leaf = parent_of(config, key)
    value = parse_value(text)
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

    return None if name == "float32" else jnp.bfloat16
