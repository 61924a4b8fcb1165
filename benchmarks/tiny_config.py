"""A tiny stand-in for a released recipe, for ``benchmarks/accelerator.py --smoke`` on a CPU.

The Cityscapes recipe's data pipeline and optimisation (19 classes, random scale, crop, flip,
photometric distortion; 2 images per device) at 32x32 crops, with the demo's narrow ResNet-18
model and no auxiliary head, memory loss or ASPP (quick to compile).
"""

from pathlib import Path

import ml_collections

from mcibi_jax.config import load_config
from mcibi_jax.recipes import released_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def get_config() -> ml_collections.ConfigDict:
    config = released_config("cityscapes", "r50")
    model = load_config(DEMO).model
    model.num_classes = config.model.num_classes
    model.auxiliary = []
    model.loss_weights.aux = []
    model.head.use_memory_loss = False
    model.head.context_dilations = []
    config.model = model
    config.name = "tiny_cityscapes"
    config.dataset.train.crop_size = (32, 32)
    config.dataset.train.pad_size = (32, 32)
    config.dataset.train.output_size = (64, 32)
    config.train.batch_size = 4  # 2 per device, as the recipe's 16 over 8 replicas
    config.train.num_replicas = 2
    return config
