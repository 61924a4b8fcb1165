"""MCIBI on Cityscapes (19 classes; trained on train+val, evaluated on test), 512x1024 crops.

Args (``configs/cityscapes.py:<arg>``) and published test mIoU, multi-scale + flip
(which is also the released evaluation setting, ``model.inference``):

    r50      ResNet-50-D8          79.97
    r101     ResNet-101-D8         82.10
    s101     ResNeSt-101-D8        81.51
    hrnet48  HRNetV2p-W48          82.54
"""

import ml_collections

from mcibi_jax.recipes import released_config


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    return released_config("cityscapes", arg)
