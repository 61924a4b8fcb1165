"""The small Python API: a ready-to-run segmenter from a released or our own checkpoint."""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mcibi_jax.models.segmentor import MCIBI, build_model
from mcibi_jax.porting.port import load_variables, model_config_of, variables_from_pth

Array = jax.Array


class Segmenter:
    """An MCIBI model with its variables, in inference mode.

    >>> config = mcibi_jax.load_config("configs/cityscapes.py:r50")
    >>> seg = mcibi_jax.Segmenter.from_pth("memorynet_deeplabv3_resnet50os8_cityscapes.pth", config)
    >>> out = seg.forward(images)  # (N, H, W, 3) float32, normalised
    >>> out["stage2"].shape        # (N, ceil(H / 8), ceil(W / 8), num_classes)
    """

    def __init__(self, model: MCIBI, variables: Mapping[str, Any], config: Mapping[str, Any]):
        self.model = model
        self.variables = dict(variables)
        self.config = config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], variables: Mapping[str, Any]) -> "Segmenter":
        return cls(build_model(model_config_of(config)), variables, config)

    @classmethod
    def from_pth(cls, path: str | os.PathLike, config: Mapping[str, Any], entry: str | None = None) -> "Segmenter":
        """From a released PyTorch checkpoint (read without torch, strictly checked)."""
        return cls.from_config(config, variables_from_pth(path, config, entry=entry))

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, config: Mapping[str, Any]) -> "Segmenter":
        """From an orbax checkpoint written by ``python -m mcibi_jax.port`` (or training)."""
        return cls.from_config(config, load_variables(directory, config))

    def forward(self, images: Array) -> dict[str, Array]:
        """Logits of both stages at head resolution, before upsampling.

        images: float32 (N, H, W, 3), already normalised; any H, W.
        Returns {"stage1": (N, h, w, K), "stage2": (N, h, w, K)}.
        """
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (N, H, W, 3), got shape {tuple(images.shape)}")
        return _forward(self.model, self.variables, images)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: MCIBI, variables: Mapping[str, Any], images: Array) -> dict[str, Array]:
    outputs = model.apply(variables, images, train=False)
    return {"stage1": outputs["stage1"], "stage2": outputs["stage2"]}
