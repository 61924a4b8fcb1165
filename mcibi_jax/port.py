"""Convert a released MCIBI ``.pth`` checkpoint into an orbax checkpoint.

    python -m mcibi_jax.port --config=configs/cityscapes.py:r50 \\
        --pth=memorynet_deeplabv3_resnet50os8_cityscapes.pth --out=ckpt/r50_cityscapes

``--ema`` ports the ``model_ema`` entry of a checkpoint trained with EMA (``--entry=model_ema``).
``--pretrained=ade20k:r50`` instead of ``--pth`` takes a released checkpoint by name (downloaded
once into the cache, see ``mcibi_jax.pretrained``); ``--config`` then defaults to its recipe.

Dotted overrides (``--config.model.num_classes=7``) apply to the config. The file is read
without torch and without executing anything in it; every key must find its place in the
model and every model variable must be filled, or nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import numpy as np

from mcibi_jax import pretrained
from mcibi_jax.config import CommandLineParser, ConfigError, config_overrides, load_config
from mcibi_jax.porting.convert import PortError
from mcibi_jax.porting.pth import PthError
from mcibi_jax.porting.variables import save_variables, variables_from_pth


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = CommandLineParser(
        prog="python -m mcibi_jax.port", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config",
        help="config file and backbone, e.g. configs/cityscapes.py:r50 "
        "(default with --pretrained: the release's own)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pth", help="released PyTorch checkpoint (.pth)")
    source.add_argument(
        "--pretrained",
        help="a released checkpoint by name, e.g. ade20k:r50 (downloaded and cached)",
    )
    parser.add_argument("--out", required=True, help="new directory for the orbax checkpoint")
    parser.add_argument(
        "--entry",
        default=None,
        help="checkpoint entry holding the weights (default: 'model', then 'state_dict', then the file itself); e.g. model_ema",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="port the EMA weights of a checkpoint trained with EMA (= --entry=model_ema)",
    )
    args, rest = parser.parse_known_args(argv)
    if args.config is None and args.pretrained is None:
        parser.error("--config is required (it may be left out with --pretrained)")
    if args.ema:
        if args.entry not in (None, "model_ema"):
            parser.error(
                f"--ema reads the entry 'model_ema'; it cannot go with --entry={args.entry}"
            )
        args.entry = "model_ema"
    return args, config_overrides(parser, rest)


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.pretrained:
            config = (
                load_config(args.config, overrides)
                if args.config
                else pretrained.apply_overrides(pretrained.config(args.pretrained), overrides)
            )
            args.pth = pretrained.download(args.pretrained)
        else:
            config = load_config(args.config, overrides)
        variables = variables_from_pth(args.pth, config, entry=args.entry)
        out = save_variables(args.out, variables)
    except (ConfigError, PthError, PortError, pretrained.PretrainedError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    leaves = {k: jax.tree_util.tree_leaves(v) for k, v in variables.items()}
    counts = {k: sum(int(np.prod(x.shape)) for x in v) for k, v in leaves.items()}
    memory = variables["memory"]["memory_module"]["memory"]
    print(
        f"ported {args.pth} -> {out}: {counts['params']:,} parameters in {len(leaves['params'])} arrays, "
        f"{len(leaves['batch_stats'])} BatchNorm statistics, memory {tuple(memory.shape)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
