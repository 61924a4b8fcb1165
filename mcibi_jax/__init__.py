"""mcibi_jax: MCIBI (MemoryNet) semantic segmentation in JAX/Flax."""

from mcibi_jax.api import Segmenter
from mcibi_jax.config import ConfigError, load_config
from mcibi_jax.models.memory import update_memory
from mcibi_jax.models.segmentor import MCIBI, build_model

__all__ = ["MCIBI", "ConfigError", "Segmenter", "build_model", "load_config", "update_memory"]
__version__ = "0.1.0"
