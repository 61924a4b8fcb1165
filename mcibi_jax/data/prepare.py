"""Writes a dataset's TFDS ``array_record`` files from its official layout.

    python -m mcibi_jax.data.prepare --config=configs/ade20k.py:r50 --data_dir=DIR \\
        [--config.dataset.root=data/ade20k] [--splits=train,val] [--num_threads=4] [--force]

reads ``config.dataset.root`` (see docs/datasets.md) and writes
``DIR/mcibi_<dataset>/1.0.0/``; read it back with
``mcibi_jax.data.tfds_builders.tfds_source(config.dataset.name, split, DIR)``.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from mcibi_jax.command_line import CommandLine, usage_error
from mcibi_jax.data.datasets import SPECS, DatasetConfigError, DatasetError, DatasetLayoutError

INSTALL = 'pip install -e ".[tfds]"'
TFDS_MODULES = ("tensorflow_datasets", "array_record", "importlib_resources")
# Datasets read without records, and why they need no preparing.
NOT_PREPARED = {
    "synthetic": "is generated in memory (configs/demo.py)",
    "custom": "is read from config.dataset.root as it is (docs/custom_datasets.md)",
}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def prepare(
    dataset_config: Any,
    data_dir: str | Path,
    *,
    splits: Sequence[str] | None = None,
    num_threads: int = 4,
    log_every: int = 100,
    skip_corrupt: bool = False,
    force: bool = False,
) -> Path:
    """Builds the records of ``dataset_config`` (``name``, ``root``) into ``data_dir``.

    Args:
      dataset_config: ``config.dataset``: ``name``, ``root``, optionally ``num_classes`` (checked).
      data_dir: where the records go (``data_dir/mcibi_<name>/<version>/``).
      splits: build only these sets (default: every set found; train and the evaluation sets
        must be there, test sets without labels are optional).
      num_threads: threads reading and encoding samples.
      log_every: print progress every that many samples (0: never).
      skip_corrupt: leave out samples that raise ``CorruptSample`` instead of failing.
      force: rebuild even if the records are already there.

    Returns:
      The folder the records are in.

    Raises:
      DatasetConfigError: unknown dataset or split, or a wrong ``num_classes``.
      DatasetLayoutError: the root, or a required set's files, are missing.
      CorruptSample: a sample cannot be used (without ``skip_corrupt``).
    """
    check_preparable(dataset_config)
    import tensorflow_datasets as tfds

    from mcibi_jax.data.tfds_builders import builder_class

    name = _get(dataset_config, "name")
    builder_cls = builder_class(str(name))
    spec = SPECS[builder_cls.DATASET]
    num_classes = _get(dataset_config, "num_classes")
    if num_classes is not None and int(num_classes) != spec.num_classes:
        raise DatasetConfigError(
            f"config says num_classes={num_classes} but {spec.name} has {spec.num_classes} classes"
        )
    root_value = _get(dataset_config, "root")
    if not root_value:
        raise DatasetConfigError(
            f"the dataset config for {spec.name} has no 'root'; pass --config.dataset.root=PATH"
        )
    root = Path(root_value).expanduser().resolve()
    if not root.is_dir():
        raise DatasetLayoutError(
            f"dataset root {root} (config.dataset.root) does not exist or is not a folder; "
            f"download the dataset there or pass --config.dataset.root=PATH. "
            f"Expected layout: {spec.layout}"
        )
    builder = builder_cls(
        data_dir=str(data_dir),
        num_threads=num_threads,
        log_every=log_every,
        skip_corrupt=skip_corrupt,
        splits=splits,
    )
    if builder.is_prepared() and not force:
        print(
            f"{builder.name} is already prepared in {builder.data_dir} "
            f"({_counts(builder)}); pass --force to rebuild",
            flush=True,
        )
        return Path(builder.data_dir)
    print(f"preparing {builder.name} from {root} into {builder.data_dir}", flush=True)
    # TFDS wants a download dir; nothing is downloaded
    scratch = tempfile.mkdtemp(prefix="mcibi_tfds_")
    try:
        modes = tfds.download.GenerateMode
        mode = modes.FORCE_REDOWNLOAD if force else modes.REUSE_DATASET_IF_EXISTS
        builder.download_and_prepare(
            download_dir=scratch,
            download_config=tfds.download.DownloadConfig(manual_dir=str(root), download_mode=mode),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"done: {builder.name} in {builder.data_dir} ({_counts(builder)})", flush=True)
    return Path(builder.data_dir)


def check_preparable(dataset_config: Any) -> None:
    """DatasetConfigError unless ``dataset_config`` names a dataset that has records to write and
    the tfds extra is installed (checked before anything is read)."""
    name = str(_get(dataset_config, "name"))
    key = name.removeprefix("mcibi_")
    if key in NOT_PREPARED:
        raise DatasetConfigError(
            f"dataset {name!r} {NOT_PREPARED[key]} and needs no preparing; records are written "
            f"for {', '.join(SPECS)}"
        )
    if key not in SPECS:
        raise DatasetConfigError(f"unknown dataset {name!r}; known: {', '.join(SPECS)}")
    missing = [module for module in TFDS_MODULES if importlib.util.find_spec(module) is None]
    if missing:
        raise DatasetConfigError(
            f"preparing records needs {', '.join(TFDS_MODULES)} (missing: {', '.join(missing)}): "
            f"{INSTALL}"
        )


def _counts(builder: Any) -> str:
    return ", ".join(f"{split}: {info.num_examples}" for split, info in builder.info.splits.items())


# The command line, set up only when this module runs as the program: absl.app.run parses the
# global absl.flags.FLAGS (with absl's logging flags) through it.
_COMMAND: CommandLine | None = None


def _define_flags() -> CommandLine:
    command = CommandLine(
        "python -m mcibi_jax.data.prepare",
        __doc__,
        config="experiment config, e.g. configs/ade20k.py:r50; its dataset (name, root) is prepared",
        flag_values=flags.FLAGS,
    )
    flags.DEFINE_string("data_dir", None, "where the records go (DIR/mcibi_<dataset>/<version>/)")
    flags.DEFINE_list("splits", None, "only these sets (default: every set found)")
    flags.DEFINE_integer("num_threads", 4, "threads reading and encoding samples")
    flags.DEFINE_integer("log_every", 100, "print progress every that many samples (0: never)")
    flags.DEFINE_bool(
        "skip_corrupt", False, "leave out unusable samples (printed) instead of failing"
    )
    flags.DEFINE_bool("force", False, "rebuild even if the records are already there")
    flags.mark_flags_as_required(["data_dir"])
    return command


def _parse_command_line(argv: list[str]) -> list[str]:
    """absl.app.run's ``flags_parser``: ``argv`` includes the program name, and so does the result."""
    return [argv[0], *_COMMAND.parse(argv[1:])]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage_error(f"unexpected arguments {argv[1:]}")
    if absl_logging.get_verbosity() == absl_logging.INFO:
        absl_logging.set_verbosity(absl_logging.WARNING)
    f = flags.FLAGS
    try:
        check_preparable(_COMMAND.config.dataset)
    except DatasetConfigError as error:
        usage_error(error)
    try:
        prepare(
            _COMMAND.config.dataset,
            f.data_dir,
            splits=f.splits,
            num_threads=f.num_threads,
            log_every=f.log_every,
            skip_corrupt=f.skip_corrupt,
            force=f.force,
        )
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    _COMMAND = _define_flags()
    app.run(main, flags_parser=_parse_command_line)
