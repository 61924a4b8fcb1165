"""The small Python API: a ready-to-run segmenter from a released or our own checkpoint."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcibi_jax import pretrained
from mcibi_jax.config import ConfigError
from mcibi_jax.data.transforms import eval_transform
from mcibi_jax.evaluation.inference import evaluation_options
from mcibi_jax.evaluation.inference import predict as predict_classes
from mcibi_jax.models.segmentor import MCIBI, build_model
from mcibi_jax.porting.variables import load_variables, model_config_of, variables_from_pth

Array = jax.Array


class Segmenter:
    """An MCIBI model with its variables, in inference mode.

    >>> config = mcibi_jax.load_config("configs/cityscapes.py:r50")
    >>> seg = mcibi_jax.Segmenter.from_pth("deeplabv3_r50_cityscapes.pth", config)
    >>> out = seg.forward(images)  # (N, H, W, 3) float32, normalised
    >>> out["stage2"].shape        # (N, ceil(H / 8), ceil(W / 8), num_classes)
    >>> labels = seg.predict(image)  # uint8 (H, W, 3) RGB -> int32 (H, W) class ids
    >>> seg = mcibi_jax.Segmenter.from_pretrained("ade20k:r50")  # downloaded and cached
    """

    def __init__(self, model: MCIBI, variables: Mapping[str, Any], config: Mapping[str, Any]):
        self.model = model
        self.variables = dict(variables)
        self.config = config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], variables: Mapping[str, Any]) -> Segmenter:
        return cls(build_model(model_config_of(config)), variables, config)

    @classmethod
    def from_pth(
        cls, path: str | os.PathLike, config: Mapping[str, Any], entry: str | None = None
    ) -> Segmenter:
        """From a released PyTorch checkpoint (read without torch, strictly checked)."""
        return cls.from_config(config, variables_from_pth(path, config, entry=entry))

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, config: Mapping[str, Any]) -> Segmenter:
        """From an orbax checkpoint written by ``python -m mcibi_jax.port`` (or training)."""
        return cls.from_config(config, load_variables(directory, config))

    @classmethod
    def from_pretrained(cls, name: str, config: Mapping[str, Any] | None = None) -> Segmenter:
        """A released model by name, e.g. ``"ade20k:r50"`` (see :mod:`mcibi_jax.pretrained`):
        downloaded into the cache and ported the first time, then read from there. ``config``
        defaults to the release's own experiment config."""
        config = pretrained.config(name) if config is None else config
        return cls.from_config(config, pretrained.load_variables(name, config))

    def forward(self, images: Array) -> dict[str, Array]:
        """Logits of both stages at head resolution, before upsampling.

        images: float32 (N, H, W, 3), already normalised; any H, W.
        Returns {"stage1": (N, h, w, K), "stage2": (N, h, w, K)}.
        """
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3), got shape {tuple(images.shape)}")
        return _forward(self.model, self.variables, images)

    def predict(self, image: np.ndarray, use_tta: bool | None = None) -> np.ndarray:
        """Class ids int32 (H, W) of one uint8 RGB image (H, W, 3), as the config evaluates.

        The image goes through the config's test pipeline (``dataset.test`` resize, then
        ``dataset.mean`` / ``dataset.std`` normalisation), is scored under the config's
        inference settings (``model.inference``, or the ``eval.tta_*`` ones when
        ``eval.use_tta`` or ``use_tta``; flips swap ``dataset.train.flip_label_pairs``) and the
        scores are resized back to (H, W) before the argmax. Needs a full experiment config
        (with ``dataset``), not only a model config.
        """
        image = check_image(image)
        normalised = preprocessor(self.config)(image)
        labels = predict_classes(
            self.model,
            self.variables,
            normalised[None],
            output_size=image.shape[:2],
            **evaluation_options(self.config, use_tta),
        )
        return np.asarray(labels[0], np.int32)


def check_image(image: Any) -> np.ndarray:
    """``image`` as a uint8 (H, W, 3) RGB numpy array, or a ValueError saying what is wrong."""
    dtype = getattr(image, "dtype", None)
    shape = tuple(getattr(image, "shape", ()))
    if dtype is None or np.dtype(dtype) != np.uint8:
        floating = dtype is not None and np.issubdtype(np.dtype(dtype), np.floating)
        hint = (
            (
                " (for floats in 0..1 use (image * 255).round().astype(np.uint8); for 0..255 "
                "image.round().astype(np.uint8))"
            )
            if floating
            else ""
        )
        raise ValueError(
            f"image must be a uint8 (H, W, 3) RGB array with values 0..255, got dtype {dtype}{hint}"
        )
    if len(shape) != 3 or shape[-1] != 3 or min(shape) < 1:
        hint = (
            " (grey: np.stack([image] * 3, -1); RGBA: image[..., :3])"
            if len(shape) in (2, 3)
            else ""
        )
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got shape {shape}{hint}")
    return np.asarray(image)


def preprocessor(config: Mapping[str, Any]):
    """``fn(image uint8 (H, W, 3)) -> float32 (h, w, 3)``: the config's test pipeline, which
    resizes for ``dataset.test.output_size`` (None: no resize) and normalises with
    ``dataset.mean`` / ``dataset.std`` (:func:`mcibi_jax.data.transforms.eval_transform`).
    """
    dataset = config.get("dataset") if "model" in config else None
    if not dataset:
        raise ConfigError(
            "prediction needs a full experiment config with a 'dataset' section "
            "(test resize, mean and std), not only a model config"
        )
    missing = [key for key in ("mean", "std", "test") if key not in dataset]
    if not missing:
        missing = [
            f"test.{key}" for key in ("output_size", "keep_ratio") if key not in dataset["test"]
        ]
    if missing:
        raise ConfigError(
            f"config.dataset lacks {', '.join(missing)}, needed for the test pipeline"
        )
    transform = eval_transform(dataset)
    return lambda image: transform({"image": image})["image"]


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: MCIBI, variables: Mapping[str, Any], images: Array) -> dict[str, Array]:
    outputs = model.apply(variables, images, train=False)
    return {"stage1": outputs["stage1"], "stage2": outputs["stage2"]}
