"""Convert a released MCIBI ``.pth`` checkpoint into an orbax checkpoint.

    python -m mcibi_jax.port --config=configs/cityscapes.py:r50 \\
        --pth=deeplabv3_r50_cityscapes.pth --out=ckpt/r50_cityscapes

``--ema`` ports the ``model_ema`` entry of a checkpoint trained with EMA (``--entry=model_ema``).
``--pretrained=ade20k:r50`` instead of ``--pth`` takes a released checkpoint by name (downloaded
once into the cache, see ``mcibi_jax.pretrained``); ``--config`` then defaults to its recipe.

``--config.<key>=<value>`` overrides (``--config.model.num_classes=7``) apply to the config, as
in every command of the package (``--help`` lists the flags). The file is read
without torch and without executing anything in it; every key must find its place in the
model and every model variable must be filled, or nothing is written.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

from mcibi_jax import pretrained
from mcibi_jax.command_line import CommandLine, usage_error
from mcibi_jax.config import ConfigError
from mcibi_jax.porting.convert import PortError
from mcibi_jax.porting.pth import PthError
from mcibi_jax.porting.variables import save_variables, variables_from_pth


def main(argv: Sequence[str] | None = None) -> int:
    command = CommandLine(
        "python -m mcibi_jax.port",
        __doc__,
        config="config file and backbone, e.g. configs/cityscapes.py:r50 "
        "(default with --pretrained: the release's own)",
    )
    fv = command.flags
    flags.DEFINE_string("pth", None, "released PyTorch checkpoint (.pth)", flag_values=fv)
    flags.DEFINE_string(
        "pretrained",
        None,
        "a released checkpoint by name, e.g. ade20k:r50 (downloaded and cached)",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "new directory for the orbax checkpoint", flag_values=fv)
    flags.DEFINE_string(
        "entry",
        None,
        "checkpoint entry holding the weights (default: 'model', then 'state_dict', then the "
        "file itself); e.g. model_ema",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "ema",
        False,
        "port the EMA weights of a checkpoint trained with EMA (= --entry=model_ema)",
        flag_values=fv,
    )
    flags.mark_flag_as_required("out", flag_values=fv)
    command.parse(argv, pretrained_config=True)
    command.one_of(["pth", "pretrained"])
    entry = fv.entry
    if fv.ema:
        if entry not in (None, "model_ema"):
            usage_error(f"--ema reads the entry 'model_ema'; it cannot go with --entry={entry}")
        entry = "model_ema"
    try:
        pth = pretrained.download(fv.pretrained) if fv.pretrained else fv.pth
        variables = variables_from_pth(pth, command.config, entry=entry)
        out = save_variables(fv.out, variables)
    except (ConfigError, PthError, PortError, pretrained.PretrainedError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    leaves = {k: jax.tree_util.tree_leaves(v) for k, v in variables.items()}
    counts = {k: sum(int(np.prod(x.shape)) for x in v) for k, v in leaves.items()}
    memory = variables["memory"]["memory_module"]["memory"]
    print(
        f"ported {pth} -> {out}: {counts['params']:,} parameters in {len(leaves['params'])} "
        f"arrays, {len(leaves['batch_stats'])} BatchNorm statistics, memory {tuple(memory.shape)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
