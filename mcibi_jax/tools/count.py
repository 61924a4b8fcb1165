"""Parameter and FLOP counts of a config's model.

    python -m mcibi_jax.tools.count --config=configs/cityscapes.py:r50 [--size=512x1024] [--config.<key>=<value>]

Parameters are counted from the variables' shapes (``jax.eval_shape``, nothing is allocated),
in total and per top-level module (backbone_net, the head's parts, auxiliary_decoder). The
forward FLOPs of one image of ``--size`` (default: ``dataset.train.crop_size``, else
``dataset.image_size``) come from XLA's cost analysis of the compiled eval-mode forward,
lowered from abstract shapes. XLA counts a multiply-add as 2 FLOPs.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mcibi_jax.command_line import CommandLine
from mcibi_jax.config import ConfigError
from mcibi_jax.models.segmentor import build_model


def default_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """``dataset.train.crop_size`` or, for the generated dataset, ``dataset.image_size``."""
    dataset = config["dataset"]
    size = (dataset.get("train", None) or {}).get("crop_size", None) or dataset.get(
        "image_size", None
    )
    if not size:
        raise ConfigError("the config has no dataset.train.crop_size; pass --size=HxW")
    size = tuple(int(s) for s in (size if isinstance(size, (list, tuple)) else (size, size)))
    return size  # type: ignore[return-value]


def parse_size(text: str) -> tuple[int, int]:
    """ "512x1024" -> (512, 1024); "512" -> (512, 512)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--size={text!r}: expected HxW, e.g. 512x1024") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"--size={text!r}: expected HxW with positive sides")
    return values[0], values[1]


def _abstract_variables(model: Any, size: tuple[int, int]) -> dict[str, Any]:
    images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def count_parameters(params: Mapping[str, Any]) -> dict[str, int]:
    """{top-level module: number of parameters} of a params tree (shapes or arrays)."""
    return {
        name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(sub))
        for name, sub in params.items()
    }


def forward_flops(model: Any, variables: Mapping[str, Any], size: tuple[int, int]) -> float:
    """FLOPs of one eval-mode forward of a (1, H, W, 3) image, by XLA's cost analysis."""
    images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    compiled = (
        jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()
    )
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def model_counts(config: Mapping[str, Any], size: tuple[int, int] | None = None) -> dict[str, Any]:
    """{"size", "params": {module: n}, "total_params", "flops"} of ``config``'s model."""
    size = tuple(size) if size is not None else default_size(config)
    model = build_model(config["model"])
    variables = _abstract_variables(model, size)
    params = count_parameters(variables["params"])
    return {
        "size": size,
        "params": params,
        "total_params": sum(params.values()),
        "flops": forward_flops(model, variables, size),
    }


def human(value: float) -> str:
    """1234567 -> '1.23M', 3.2e9 -> '3.20G'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def format_counts(counts: Mapping[str, Any]) -> str:
    width = max(len("total"), *(len(k) for k in counts["params"]))
    lines = [f"{'module':<{width}}  {'params':>10}"]
    lines += [f"{name:<{width}}  {human(n):>10}  ({n:,})" for name, n in counts["params"].items()]
    lines.append(
        f"{'total':<{width}}  {human(counts['total_params']):>10}  ({counts['total_params']:,})"
    )
    h, w = counts["size"]
    lines.append(
        f"forward FLOPs per {h}x{w} image: {human(counts['flops'])} ({counts['flops']:.4g})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    command = CommandLine(
        "python -m mcibi_jax.tools.count",
        __doc__,
        config="config file and backbone, e.g. configs/cityscapes.py:r50",
    )
    size = flags.DEFINE_string(
        "size", None, "image size HxW (default: dataset.train.crop_size)", flag_values=command.flags
    )
    command.parse(argv)
    try:
        counts = model_counts(command.config, parse_size(size.value) if size.value else None)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_counts(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
