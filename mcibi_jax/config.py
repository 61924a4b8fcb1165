"""Loading experiment configs: ``configs/<dataset>.py:<backbone>`` plus dotted overrides."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
    """A config file, argument or override that cannot be used."""


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, dotted: str) -> None:
    """Applies ``a.b.c=value`` (value parsed as a Python literal, else kept as a string)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} is not of the form key=value")
    key, text = dotted.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} in override {dotted!r}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
        raise ConfigError(f"unknown config key {key!r}; keys here: {known}")
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


def load_config(spec: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``load_config("configs/cityscapes.py:r50", ["model.num_classes=7"])``."""
    spec = str(spec)
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_mcibi_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file} has no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


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


def compute_dtype(name: str) -> Any:
    """What ``build_model(..., dtype=)`` takes for a ``config.dtype`` name: None for float32."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported; choose one of {', '.join(COMPUTE_DTYPES)}")
    import jax.numpy as jnp

    return None if name == "float32" else jnp.bfloat16
