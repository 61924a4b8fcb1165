"""Segment image files with a trained or ported MCIBI model.

    python -m mcibi_jax.predict --config=configs/ade20k.py:r50 --checkpoint=ckpt/r50_ade20k \\
        --input=photos/ --output=masks/ [--overlay_alpha=0.5] [--overlay_background=auto|none|ID]
        [--tta] [--recursive] [--overwrite]

``--pth=FILE`` reads a released PyTorch checkpoint instead of ``--checkpoint=DIR`` (ported on
the fly, as ``python -m mcibi_jax.port`` would); ``--pretrained=ade20k:r50`` takes a released
model by name (downloaded and cached, see ``mcibi_jax.pretrained``; ``--config`` then defaults
to its released config); ``--config.<key>=<value>`` changes the config.
Each image (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, in sorted order; a folder is searched
non-recursively unless ``--recursive``, which mirrors its sub-folders in the output) goes
through the config's test pipeline and inference settings (``--tta``: the ``eval.tta_*``
ones) and gives, at its original size:

    NAME_mask.png      the classes in the dataset's colours
    NAME_labels.png    the class ids (8-bit; 16-bit for more than 256 classes)
    NAME_overlay.jpg   the image blended with the mask (--overlay_alpha of mask); the background
                       class (--overlay_background) is left unpainted

Existing files are kept unless ``--overwrite``. Unreadable images are reported and skipped.
Exit status: 0 done, 1 some images could not be read or written, 2 nothing could run (bad
arguments, config, checkpoint or input).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import ml_collections
import numpy as np
from absl import flags
from PIL import Image, ImageOps

from mcibi_jax import compilation_cache
from mcibi_jax import pretrained as released
from mcibi_jax.api import Segmenter, preprocessor
from mcibi_jax.command_line import CommandLine
from mcibi_jax.config import ConfigError
from mcibi_jax.data.classes import background_class, dataset_palette
from mcibi_jax.evaluation.inference import evaluation_options
from mcibi_jax.porting.convert import PortError
from mcibi_jax.porting.pth import PthError
from mcibi_jax.train.checkpoints import BEST, latest_checkpoint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
OUTPUT_SUFFIXES = ("_mask.png", "_labels.png", "_overlay.jpg")
# --config of the commands that also take --pretrained (predict, serve, export).
CONFIG_HELP = (
    "config file and argument, e.g. configs/ade20k.py:r50 (default with --pretrained: the "
    "release's own)"
)


def overlay_background(
    choice: str, dataset_config: Mapping[str, Any] | None, num_classes: int
) -> int | None:
    """``--overlay_background``: 'auto' (:func:`background_class`), 'none' (paint every
    class) or a class id; raises ConfigError for anything else."""
    if choice == "auto":
        return background_class(dataset_config, num_classes)
    if choice == "none":
        return None
    try:
        index = int(choice)
    except ValueError:
        index = -1
    if not 0 <= index < num_classes:
        raise ConfigError(
            f"--overlay_background must be 'auto', 'none' or a class id 0..{num_classes - 1}, got {choice!r}"
        )
    return index


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """int (H, W) class ids -> uint8 (H, W, 3) colours."""
    return palette[labels]


def blend(
    image: np.ndarray, mask: np.ndarray, alpha: float, keep: np.ndarray | None = None
) -> np.ndarray:
    """uint8 (H, W, 3) ``(1 - alpha) * image + alpha * mask``, rounded; where the bool (H, W)
    ``keep`` is set (e.g. the background class) the image is left as it is."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * mask.astype(np.float32)
    mixed = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return mixed if keep is None else np.where(keep[..., None], image, mixed)


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray,
    alpha: float,
    background: int | None = None,
) -> np.ndarray:
    """uint8 (H, W, 3): ``image`` blended with the class colours of int ``labels`` (H, W);
    pixels of class ``background`` keep the image."""
    keep = None if background is None else labels == background
    return blend(image, colorize(labels, palette), alpha, keep)


# --------------------------------------------------------------------------------------------
# Files


def find_images(
    source: Path, recursive: bool = False, exclude: Path | None = None
) -> tuple[Path, list[Path]]:
    """(folder the output names are relative to, the image files of ``source`` sorted).

    ``source`` is one file (taken whatever its extension) or a folder. Files this tool wrote
    under ``exclude`` (the output folder) are left out, so outputs inside the input folder are
    never read back as inputs.
    """
    if source.is_file():
        return source.parent, [source]
    if not source.is_dir():
        raise FileNotFoundError(f"input {source} does not exist")
    candidates = source.rglob("*") if recursive else source.iterdir()
    images = [p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if exclude is not None:
        exclude = exclude.resolve()

        def ours(p: Path) -> bool:
            return p.name.endswith(OUTPUT_SUFFIXES) and p.resolve().is_relative_to(exclude)

        images = [p for p in images if not ours(p)]
    return source, sorted(images, key=lambda p: p.relative_to(source).as_posix())


def output_stems(images: Sequence[Path], root: Path) -> list[Path]:
    """Per image the output path without suffix, relative to the output folder: the image's
    path under ``root`` without its extension, plus ``_<ext>`` where two images would share it
    (``a.jpg`` and ``a.png`` -> ``a_jpg`` and ``a_png``)."""
    plain = [p.relative_to(root).with_suffix("") for p in images]
    counts: dict[str, int] = {}
    for stem in plain:
        counts[stem.as_posix().lower()] = counts.get(stem.as_posix().lower(), 0) + 1
    return [
        stem.with_name(f"{stem.name}_{p.suffix[1:].lower()}")
        if counts[stem.as_posix().lower()] > 1
        else stem
        for stem, p in zip(plain, images)
    ]


def read_rgb(path: Path | BinaryIO) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file (a path or an open binary file), turned upright by
    its EXIF orientation (as OpenCV's imread does); any decoding problem raises ValueError."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "F"):  # 16-bit or float grey: scale to 8 bits
                grey = np.asarray(image, np.float64)
                top = 65535.0 if grey.max() > 255 else 255.0
                return np.repeat(
                    np.rint(np.clip(grey, 0, top) * 255 / top).astype(np.uint8)[..., None], 3, -1
                )
            return np.asarray(image.convert("RGB"), np.uint8)
    except Exception as error:  # Pillow raises many types for damaged or foreign files
        raise ValueError(f"{type(error).__name__}: {error}") from None


def label_image(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids in the dtype of their grey PNG: uint8 when they fit (K <= 256), else uint16."""
    return np.asarray(labels, np.uint8 if num_classes <= 256 else np.uint16)


def write_label_png(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """Class ids as a grey PNG: 8-bit when they fit (K <= 256), else 16-bit."""
    _save(label_image(labels, num_classes), path, "PNG")


def _save(array: np.ndarray, path: Path, fmt: str, **options: Any) -> None:
    """Writes through a temporary name, so an interrupted run leaves no partial file behind."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(array).save(temporary, format=fmt, **options)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Command line


WEIGHT_FLAGS = ("checkpoint", "pth", "pretrained")


def define_weight_flags(flag_values: flags.FlagValues) -> None:
    """``--checkpoint`` | ``--pth`` | ``--pretrained`` (``CommandLine.one_of(WEIGHT_FLAGS)``
    checks that exactly one is given), for :func:`load_segmenter`."""
    flags.DEFINE_string(
        "checkpoint",
        None,
        "orbax checkpoint directory (from training or python -m mcibi_jax.port), "
        "or a training workdir (its best checkpoint, else its newest)",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "pth",
        None,
        "released PyTorch checkpoint (.pth), ported on the fly",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "pretrained",
        None,
        "a released model by name, e.g. ade20k:r50 (downloaded once into ~/.cache/mcibi_jax or "
        "$MCIBI_CACHE; --config then defaults to its released config)",
        flag_values=flag_values,
    )


def parse_command_line(argv: Sequence[str] | None = None) -> CommandLine:
    """The parsed command line of ``python -m mcibi_jax.predict`` (usage errors exit with 2)."""
    command = CommandLine(
        "python -m mcibi_jax.predict",
        __doc__,
        config=CONFIG_HELP,
    )
    fv = command.flags
    define_weight_flags(fv)
    flags.DEFINE_string("input", None, "an image file or a folder of images", flag_values=fv)
    flags.DEFINE_string(
        "output", None, "folder for the outputs (created if needed)", flag_values=fv
    )
    flags.DEFINE_float(
        "overlay_alpha", 0.5, "weight of the mask in the overlay, 0..1", flag_values=fv
    )
    flags.DEFINE_string(
        "overlay_background",
        "auto",
        "class left unpainted in the overlay: auto (the dataset's 'background' class: LIP and "
        "the demo class 0; Cityscapes, ADE20K, COCO-Stuff have none), none (paint every class) "
        "or a class id",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "tta", False, "use the eval.tta_* settings (multi-scale, flip)", flag_values=fv
    )
    flags.DEFINE_bool(
        "recursive", False, "also search the input folder's sub-folders", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "replace existing output files", flag_values=fv)
    flags.mark_flags_as_required(["input", "output"], flag_values=fv)
    command.parse(argv, pretrained_config=True)
    command.one_of(WEIGHT_FLAGS)
    return command


def _describe(settings: Mapping[str, Any]) -> str:
    mode = settings.get("mode", "whole")
    if mode == "slide":
        mode += f" {tuple(settings['cropsize'])} windows, stride {tuple(settings['stride'])}"
    scales = [float(s) for s in settings.get("multiscale") or [1.0]]
    return f"{mode}, scales {scales}, flip {bool(settings.get('flip', False))}"


def _prepare(command: CommandLine):
    """(config, inference settings, segmenter, input root, images, output folder); raises
    ConfigError, PthError, PortError or OSError for anything that keeps the run from starting."""
    fv, config = command.flags, command.config
    if not 0.0 <= fv.overlay_alpha <= 1.0:
        raise ConfigError(f"--overlay_alpha must be within 0..1, got {fv.overlay_alpha}")
    check_config(config)
    overlay_background(
        fv.overlay_background, config.get("dataset"), int(config["model"]["num_classes"])
    )
    settings = evaluation_options(config, True if fv.tta else None)["inference"]  # checked
    warn_without_tta(config, fv.tta)
    if not fv.pretrained:
        check_weights(fv.checkpoint, fv.pth)
    output = Path(fv.output)
    root, images = find_images(Path(fv.input), fv.recursive, exclude=output)
    if not images:
        below = "or below " if fv.recursive else ""
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {below}{fv.input}")
    check_writable(output)
    segmenter = load_segmenter(
        config, checkpoint=fv.checkpoint, pth=fv.pth, pretrained=fv.pretrained
    )
    output.mkdir(parents=True, exist_ok=True)
    return config, settings, segmenter, root, images, output


def check_writable(folder: Path) -> None:
    """OSError (one line) unless files can be written into ``folder``, or, while it does not
    exist yet, into the nearest existing folder above it (where it will be created)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"--output {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mcibi_write_test_"):
            pass
    except OSError as error:
        raise OSError(
            f"--output {folder}: cannot write into {existing} ({error.strerror or error}); "
            "choose another --output"
        ) from None


def warn_without_tta(config: Mapping[str, Any], tta: bool) -> None:
    """Warns (one line on stderr) that ``--tta`` changes nothing when the config has no
    ``eval.tta_*`` settings."""
    if tta and not any(str(key).startswith("tta_") for key in config["eval"]):
        print(
            "warning: --tta has no effect: the config has no eval.tta_* settings; "
            "using model.inference",
            file=sys.stderr,
            flush=True,
        )


def check_weights(checkpoint: str | os.PathLike | None, pth: str | os.PathLike | None) -> None:
    """FileNotFoundError (one line) where ``pth`` or ``checkpoint`` does not exist, or
    ``checkpoint`` is a file (it takes a folder)."""
    weights = Path(pth or checkpoint or "")
    if not (pth or checkpoint) or not weights.exists():
        raise FileNotFoundError(f"no checkpoint at {weights}")
    if not pth and weights.is_file():
        raise FileNotFoundError(
            f"--checkpoint takes a checkpoint folder (orbax), not the file {weights}; "
            "for a released .pth file use --pth=FILE"
        )


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` itself, checked to run the test pipeline (ConfigError otherwise)."""
    preprocessor(config)
    return config


def load_segmenter(
    config: Any,
    checkpoint: str | os.PathLike | None = None,
    pth: str | os.PathLike | None = None,
    pretrained: str | None = None,
):
    """A :class:`mcibi_jax.Segmenter` from ``pretrained`` (a released model by name, downloaded
    and cached), ``pth`` (a released .pth, ported on the fly) or ``checkpoint`` (an orbax
    checkpoint, or a training workdir: its best, else newest one).

    Raises FileNotFoundError, PthError, PortError or PretrainedError with a one-line message.
    """
    if pretrained:
        return Segmenter.from_pretrained(pretrained, config)
    check_weights(checkpoint, pth)
    weights = Path(pth or checkpoint or "")
    if pth:
        return Segmenter.from_pth(weights, config)
    weights = workdir_checkpoint(weights)
    try:
        return Segmenter.from_checkpoint(weights, config)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{weights} is not a checkpoint directory ({error})") from None


def workdir_checkpoint(path: Path) -> Path:
    """``path`` itself, or for a training workdir (``python -m mcibi_jax.main --workdir``) its
    best checkpoint, else its newest one."""
    if (path / "_METADATA").exists() or not (path / "checkpoints").is_dir():
        return path
    best = path / "checkpoints" / BEST
    chosen = best if (best / "_METADATA").exists() else latest_checkpoint(path)
    print(f"{path} is a training workdir: using {chosen}", flush=True)
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_command_line(argv)
    fv = command.flags
    compilation_cache.enable()

    def out(message: str) -> None:
        print(message, flush=True)

    def warn(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        config, settings, segmenter, root, images, output = _prepare(command)
    except (ConfigError, PthError, PortError, released.PretrainedError, OSError) as error:
        # OSError: missing files, unusable --output
        warn(f"error: {error}")
        return 2
    use_tta = True if fv.tta else None

    num_classes = int(config["model"]["num_classes"])
    palette = dataset_palette(config.get("dataset"), num_classes)
    # checked in _prepare
    background = overlay_background(fv.overlay_background, config.get("dataset"), num_classes)
    stems = output_stems(images, root)
    out(f"{len(images)} image(s) from {fv.input} -> {output}; inference: {_describe(settings)}")
    done, skipped, failed = 0, [], []
    started = time.perf_counter()
    for index, (path, stem) in enumerate(zip(images, stems), 1):
        tick = time.perf_counter()
        prefix = f"[{index}/{len(images)}] {path}"
        targets = {
            suffix: output / stem.parent / f"{stem.name}{suffix}" for suffix in OUTPUT_SUFFIXES
        }
        todo = {s: p for s, p in targets.items() if fv.overwrite or not p.exists()}
        kept = [p.name for s, p in targets.items() if s not in todo]
        if not todo:
            skipped.append(str(path))
            out(f"{prefix} ... skipped, outputs exist ({', '.join(kept)}); --overwrite to redo")
            continue
        try:
            image = read_rgb(path)
        except ValueError as error:
            failed.append(str(path))
            warn(f"{prefix} ... unreadable, skipped: {error}")
            continue
        labels = segmenter.predict(image, use_tta=use_tta)
        mask = colorize(labels, palette)
        try:
            targets["_mask.png"].parent.mkdir(parents=True, exist_ok=True)
            if "_mask.png" in todo:
                _save(mask, todo["_mask.png"], "PNG")
            if "_labels.png" in todo:
                write_label_png(todo["_labels.png"], labels, num_classes)
            if "_overlay.jpg" in todo:
                keep = None if background is None else labels == background
                _save(
                    blend(image, mask, fv.overlay_alpha, keep),
                    todo["_overlay.jpg"],
                    "JPEG",
                    quality=90,
                )
        except OSError as error:
            failed.append(str(path))
            warn(f"{prefix} ... cannot write the outputs: {error}")
            continue
        done += 1
        note = f" (kept existing {', '.join(kept)})" if kept else ""
        out(
            f"{prefix} {image.shape[1]}x{image.shape[0]} ... {time.perf_counter() - tick:.2f} s{note}"
        )

    summary = f"{done} segmented, {len(skipped)} skipped (outputs exist), {len(failed)} failed"
    out(f"{summary} in {time.perf_counter() - started:.1f} s; outputs in {output}")
    if failed:
        warn("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
