"""Export a model's whole inference for serving, with ``jax.export``.

    python -m mcibi_jax.export --config=configs/ade20k.py:r50 --checkpoint=ckpt/r50_ade20k --out=served/r50 \\
        [--size=512x683] [--tta] [--labels_only] [--platforms=cpu,cuda]
    python -m mcibi_jax.export --pretrained=ade20k:r50 --out=served/r50 --size=512x683

The exported function takes uint8 RGB images ``(batch, H, W, 3)`` and returns
``{"labels": int32 (batch, H, W), "probabilities": float32 (batch, H, W, K)}``: the config's
test resize and normalisation, its inference (whole image or sliding windows, scales, flip;
``--tta``: the ``eval.tta_*`` settings), the scores resized back to (H, W), softmax and argmax
-- the masks ``Segmenter.predict`` computes (the test resize reproduces OpenCV's fixed-point
bilinear bit for bit). The weights are constants inside it. The batch size
is symbolic (any batch runs); H and W are fixed by ``--size`` (default: the dataset's crop or
image size), because the test resize, the sliding windows and the interpolation matrices of
the network depend on them; export once per image size you serve.

OUT/model.jaxexport holds the serialized function, OUT/model.json the class names, palette,
input and output specs and the settings it was made with. Loading needs only JAX (and the
``flatbuffers`` package), no model code::

    exported = jax.export.deserialize(bytearray(open("OUT/model.jaxexport", "rb").read()))
    out = exported.call(images)   # uint8 (N, H, W, 3) -> out["labels"], out["probabilities"]
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax import export

from mcibi_jax.api import preprocessor
from mcibi_jax.command_line import CommandLine
from mcibi_jax.config import ConfigError
from mcibi_jax.data.classes import class_names, dataset_palette
from mcibi_jax.data.transforms import normalize_image, test_shape
from mcibi_jax.evaluation.inference import evaluation_options
from mcibi_jax.evaluation.tta import tta_scores
from mcibi_jax.porting.convert import PortError
from mcibi_jax.porting.pth import PthError
from mcibi_jax.predict import (
    CONFIG_HELP,
    WEIGHT_FLAGS,
    check_config,
    define_weight_flags,
    load_segmenter,
    warn_without_tta,
)
from mcibi_jax.pretrained import PretrainedError

FORMAT = "mcibi_jax.export/1"
FUNCTION_FILE = "model.jaxexport"
SPEC_FILE = "model.json"
INSTALL = 'pip install -e ".[export]"'
# The platform names jax.export lowers for ("gpu" is an alias it resolves only on this machine).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def default_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) to export for when none is given: the generated dataset's image size, else the
    training crop size."""
    dataset = config["dataset"]
    if "image_size" in dataset:
        return tuple(int(v) for v in dataset["image_size"])  # type: ignore[return-value]
    return tuple(int(v) for v in dataset["train"]["crop_size"])  # type: ignore[return-value]


def parse_size(text: str) -> tuple[int, int]:
    """``"512x683"`` (height x width) -> (512, 683); ConfigError otherwise."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--size must be HEIGHTxWIDTH in pixels, e.g. 512x683; got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_platforms(values: Sequence[str] | None) -> list[str] | None:
    """``--platforms`` (lower-cased, blanks dropped; None: this machine's backend); ConfigError
    for a name jax.export does not lower for."""
    platforms = [p.strip().lower() for p in values or () if p.strip()]
    for platform in platforms:
        if platform not in PLATFORMS:
            hint = " (gpu: cuda for NVIDIA, rocm for AMD)" if platform == "gpu" else ""
            raise ConfigError(
                f"--platforms: unknown platform {platform!r}{hint}; choose from {', '.join(PLATFORMS)}"
            )
    return platforms or None


def check_serializable() -> None:
    """ConfigError unless ``Exported.serialize`` can run (it needs ``flatbuffers``), checked
    before the model is loaded and traced."""
    if importlib.util.find_spec("flatbuffers") is None:
        raise ConfigError(f"saving an export needs the flatbuffers package: {INSTALL}")


def _lookup_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(256, 3) float32: the normalised value of each grey level per channel, computed by the
    test pipeline's own :func:`normalize_image`, so the export normalises bit-identically."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3)
    return normalize_image(levels, mean, std)[:, 0]


def _opencv_taps(
    in_size: int, out_size: int, clip_weights: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first source index, second source index, their weights in 1/2048) per output pixel of
    OpenCV's INTER_LINEAR along one axis: float32 source positions, weights rounded to 11 bits.
    OpenCV zeroes the weight past the border along x (``clip_weights``) but not along y, where
    it only clamps the row index."""
    position = ((np.arange(out_size) + 0.5) * (1.0 / (out_size / in_size)) - 0.5).astype(np.float32)
    start = np.floor(position).astype(np.int64)
    fraction = (position - start).astype(np.float32)
    if clip_weights:
        fraction[(start < 0) | (start >= in_size - 1)] = 0
        start = np.clip(start, 0, in_size - 1)
    first, second = np.clip(start, 0, in_size - 1), np.clip(start + 1, 0, in_size - 1)
    return (
        first,
        second,
        np.rint((1 - fraction) * 2048).astype(np.int32),
        np.rint(fraction * 2048).astype(np.int32),
    )


def _resize_uint8(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """uint8 (N, H, W, C) -> uint8 (N, *size, C), bit-identical to ``cv2.resize(...,
    INTER_LINEAR)`` as the test pipeline calls it: 11-bit fixed-point weights, the horizontal
    pass in integers, the vertical pass rounded as OpenCV's vectorised kernel rounds it."""
    height, width = images.shape[1:3]
    x0, x1, a0, a1 = _opencv_taps(width, size[1], clip_weights=True)
    y0, y1, b0, b1 = _opencv_taps(height, size[0], clip_weights=False)
    pixels = images.astype(jnp.int32)
    # (N, H, w, C), < 2 ** 20
    rows = pixels[:, :, x0] * a0[:, None] + pixels[:, :, x1] * a1[:, None]
    top, bottom = rows[:, y0] >> 4, rows[:, y1] >> 4
    mixed = ((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16)
    return jnp.clip((mixed + 2) >> 2, 0, 255).astype(jnp.uint8)


def serving_function(
    segmenter: Any, size: tuple[int, int], use_tta: bool | None = None, probabilities: bool = True
) -> tuple[Callable[[jax.Array], dict[str, jax.Array]], dict[str, Any]]:
    """(fn, settings): ``fn(images uint8 (N, *size, 3)) -> {"labels": int32 (N, *size),
    "probabilities": float32 (N, *size, K)}`` as :meth:`Segmenter.predict` computes them, and
    the test-pipeline and inference settings it applies."""
    config = segmenter.config
    preprocessor(config)  # the config has a test pipeline (raises ConfigError otherwise)
    dataset = config["dataset"]
    options = evaluation_options(config, use_tta)
    mean, std = tuple(dataset["mean"]), tuple(dataset["std"])
    resized = test_shape(dataset, tuple(size))
    table = jnp.asarray(_lookup_table(mean, std))
    model, variables = segmenter.model, segmenter.variables
    with_probabilities = bool(options["inference"].get("use_probs_before_resize", False))

    def fn(images: jax.Array) -> dict[str, jax.Array]:
        if tuple(resized) != tuple(images.shape[1:3]):
            images = _resize_uint8(images, resized)
        normalised = jnp.stack(
            [table[:, c][images[..., c].astype(jnp.int32)] for c in range(3)], axis=-1
        )
        scores = tta_scores(
            model,
            variables,
            normalised,
            options["inference"],
            align_corners=options["align_corners"],
            flip_label_pairs=options["flip_label_pairs"],
            output_size=tuple(size),
        )
        outputs = {"labels": jnp.argmax(scores, axis=-1).astype(jnp.int32)}
        if probabilities:  # averaged probabilities already, or averaged logits
            outputs["probabilities"] = (
                scores if with_probabilities else jax.nn.softmax(scores, axis=-1)
            )
        return outputs

    settings = {
        "test_resize": None if tuple(resized) == tuple(size) else list(resized),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "inference": json.loads(json.dumps(dict(options["inference"]), default=list)),
        "flip_label_pairs": [list(p) for p in options["flip_label_pairs"]],
    }
    return fn, settings


def export_segmenter(
    segmenter: Any,
    size: tuple[int, int],
    *,
    use_tta: bool | None = None,
    probabilities: bool = True,
    platforms: Sequence[str] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(``jax.export.Exported`` with a symbolic batch, its JSON spec)."""
    platforms = parse_platforms(platforms)
    fn, settings = serving_function(segmenter, size, use_tta, probabilities)
    (batch,) = export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, int(size[0]), int(size[1]), 3), jnp.uint8)
    exported = export.export(jax.jit(fn), platforms=tuple(platforms) if platforms else None)(spec)
    config = segmenter.config
    num_classes = int(config["model"]["num_classes"])
    height, width = int(size[0]), int(size[1])
    outputs = {
        "labels": {
            "dtype": "int32",
            "shape": ["batch", height, width],
            "meaning": "class id per pixel",
        }
    }
    if probabilities:
        outputs["probabilities"] = {
            "dtype": "float32",
            "shape": ["batch", height, width, num_classes],
            "meaning": "class probabilities per pixel",
        }
    description = {
        "format": FORMAT,
        "name": str(config.get("name", "")),
        "function": FUNCTION_FILE,
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", height, width, 3],
            "meaning": "RGB images, 0..255, NHWC",
        },
        "outputs": outputs,
        "symbolic_dims": ["batch"],
        "platforms": list(exported.platforms),
        "num_classes": num_classes,
        "classes": class_names(config.get("dataset"), num_classes),
        "palette": dataset_palette(config.get("dataset"), num_classes).tolist(),
        **settings,
        "jax_version": jax.__version__,
    }
    return exported, description


def save(directory: str | os.PathLike, exported: Any, description: Mapping[str, Any]) -> Path:
    """Writes OUT/model.jaxexport and OUT/model.json into a new (or empty) directory."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new output directory")
    try:
        blob = exported.serialize()
    except ImportError as error:
        raise ConfigError(f"{error} ({INSTALL})") from None
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (
        (FUNCTION_FILE, bytes(blob)),
        (SPEC_FILE, (json.dumps(description, indent=1) + "\n").encode()),
    ):
        temporary = directory / f".{name}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, directory / name)
    return directory


def load(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(``jax.export.Exported``, its spec) of an export directory; needs no model code."""
    directory = Path(directory)
    description = json.loads((directory / SPEC_FILE).read_text())
    return jax.export.deserialize(
        bytearray((directory / description["function"]).read_bytes())
    ), description


# --------------------------------------------------------------------------------------------
# Command line


def parse_command_line(argv: Sequence[str] | None = None) -> CommandLine:
    """The parsed command line of ``python -m mcibi_jax.export`` (usage errors exit with 2)."""
    command = CommandLine(
        "python -m mcibi_jax.export",
        __doc__,
        config=CONFIG_HELP,
    )
    fv = command.flags
    define_weight_flags(fv)
    flags.DEFINE_string(
        "out", None, "new directory for model.jaxexport and model.json", flag_values=fv
    )
    flags.DEFINE_string(
        "size",
        None,
        "HEIGHTxWIDTH of the served images (default: the dataset's crop or image size)",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "tta", False, "use the eval.tta_* settings (multi-scale, flip)", flag_values=fv
    )
    flags.DEFINE_bool(
        "labels_only", False, "return only the labels, not the probabilities", flag_values=fv
    )
    flags.DEFINE_list(
        "platforms",
        None,
        "comma-separated, e.g. cpu,cuda,tpu (default: this machine's backend)",
        flag_values=fv,
    )
    flags.mark_flag_as_required("out", flag_values=fv)
    command.parse(argv, pretrained_config=True)
    command.one_of(WEIGHT_FLAGS)
    return command


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_command_line(argv)
    fv = command.flags
    try:
        out = Path(fv.out)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out.absolute()} exists and is not empty; choose a new output directory"
            )
        platforms = parse_platforms(fv.platforms)
        check_serializable()
        config = check_config(command.config)
        size = parse_size(fv.size) if fv.size else None
        warn_without_tta(config, fv.tta)
        segmenter = load_segmenter(
            config, checkpoint=fv.checkpoint, pth=fv.pth, pretrained=fv.pretrained
        )
        size = size or default_size(segmenter.config)
        exported, description = export_segmenter(
            segmenter,
            size,
            use_tta=True if fv.tta else None,
            probabilities=not fv.labels_only,
            platforms=platforms,
        )
        directory = save(out, exported, description)
    except (ConfigError, PthError, PortError, PretrainedError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    mode = description["inference"]
    print(
        f"exported {description['name'] or 'model'} -> {directory}: images uint8 (batch, {size[0]}, {size[1]}, 3), "
        f"{description['num_classes']} classes, inference {mode.get('mode', 'whole')} scales "
        f"{list(mode.get('multiscale') or [1.0])} flip {bool(mode.get('flip'))}, platforms "
        f"{','.join(description['platforms'])}, {(directory / FUNCTION_FILE).stat().st_size / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
