"""MCIBI on ADE20k (150 classes; train / val), 512x512 crops.

Args (``configs/ade20k.py:<arg>``) and published val mIoU, single-scale / multi-scale + flip
(``eval.use_tta=True``):

    r50      ResNet-50-D8          44.39 / 45.97
    r101     ResNet-101-D8         45.66 / 47.27
    s101     ResNeSt-101-D8        46.63 / 47.39
    hrnet48  HRNetV2p-W48          45.79 / 47.46
    vitl     ViT-Large (p16)       50.08 / 51.63
"""

import ml_collections

from mcibi_jax.recipes import released_config


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    return released_config("ade20k", arg)
