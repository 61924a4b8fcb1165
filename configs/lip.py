"""MCIBI on LIP (20 classes; train / val), 473x473 crops.

Args (``configs/lip.py:<arg>``) and published val mIoU, single-scale / with flip
(``eval.use_tta=True``):

    r50      ResNet-50-D8          53.73 / 54.08
    r101     ResNet-101-D8         55.02 / 55.42
    s101     ResNeSt-101-D8        56.21 / 56.34
    hrnet48  HRNetV2p-W48          56.40 / 56.99

The released r50 and r101 heads use LeakyReLU(0.01) (``model.head.negative_slope``).
"""

import ml_collections

from mcibi_jax.recipes import released_config


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    return released_config("lip", arg)
