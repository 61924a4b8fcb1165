"""MCIBI on COCO-Stuff-10k (182 classes; train / test), 512x512 crops.

Args (``configs/cocostuff10k.py:<arg>``) and published test mIoU, single-scale / multi-scale +
flip (``eval.use_tta=True``):

    r50      ResNet-50-D8          38.84 / 39.78
    r101     ResNet-101-D8         39.84 / 41.52
    s101     ResNeSt-101-D8        41.18 / 42.38
    hrnet48  HRNetV2p-W48          39.77 / 41.48
    vitl     ViT-Large (p16)       44.27 / 45.50
"""

import ml_collections

from mcibi_jax.recipes import released_config


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    return released_config("cocostuff10k", arg)
