"""Command-line pieces shared by the benchmark scripts (which import it from their own folder)."""

from __future__ import annotations

import argparse

from mcibi_jax.config import COMPUTE_DTYPES, ConfigError, compute_dtype_names

# One recipe per backbone, at its recipe's crop size.
DEFAULT_CONFIGS = [
    "configs/cityscapes.py:r50",
    "configs/cityscapes.py:r101",
    "configs/cityscapes.py:s101",
    "configs/cityscapes.py:hrnet48",
    "configs/ade20k.py:vitl",
]
DEFAULT_DTYPES = ",".join(COMPUTE_DTYPES)


def remat_overrides(remat: bool) -> list[str]:
    """Config overrides for activation rematerialisation: the backbone's blocks and the head."""
    return [f"model.backbone.remat={remat}", f"model.head.remat={remat}"]


def parse_dtypes(text: str) -> list[str]:
    """``"float32,bfloat16"`` -> ``["float32", "bfloat16"]`` (argparse type; duplicates dropped)."""
    try:
        return compute_dtype_names(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1024"`` -> ``(512, 1024)`` (argparse type)."""
    try:
        height, width = (int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 512x1024, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return height, width


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--configs, --size and --dtypes (alias --dtype)."""
    parser.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated config specs"
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=None,
        help="HxW instead of the recipe's crop size, e.g. 256x512",
    )
    parser.add_argument(
        "--dtypes",
        "--dtype",
        dest="dtypes",
        type=parse_dtypes,
        default=DEFAULT_DTYPES,
        help=f"comma-separated compute dtypes among {', '.join(COMPUTE_DTYPES)} (default: %(default)s)",
    )
