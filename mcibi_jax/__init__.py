"""mcibi_jax: MCIBI (MemoryNet) semantic segmentation in JAX/Flax."""

from typing import Any

from mcibi_jax.config import ConfigError, load_config
from mcibi_jax.models.memory import update_memory
from mcibi_jax.models.segmentor import MCIBI, build_model

__all__ = ["MCIBI", "ConfigError", "Segmenter", "build_model", "load_config", "update_memory"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Segmenter on first use: mcibi_jax.api imports mcibi_jax.pretrained, which then could not
    # run as `python -m mcibi_jax.pretrained` without runpy's "found in sys.modules" warning.
    if name == "Segmenter":
        from mcibi_jax.api import Segmenter

        return Segmenter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
