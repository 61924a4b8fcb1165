"""LIP r50/r101 were released with LeakyReLU(0.01) heads; the slope must reach every head layer."""

from __future__ import annotations

import jax
import numpy as np

import mcibi_jax
from mcibi_jax.recipes import released_config
from mcibi_jax.reference_config import model_config_from_reference
from tests.reference_data import FIXTURES, read_case


def test_released_lip_resnets_use_leaky_heads():
    assert released_config("lip", "r50").model.head.negative_slope == 0.01
    assert released_config("lip", "r101").model.head.negative_slope == 0.01
    assert released_config("lip", "s101").model.head.negative_slope == 0.0


def test_reference_act_cfg_becomes_negative_slope_and_changes_outputs():
    meta, arrays = read_case("resnet50_cityscapes")
    ref = dict(meta["reference_config"], act_cfg={"type": "LeakyReLU", "negative_slope": 0.01})
    leaky_config = model_config_from_reference(ref)
    assert leaky_config.head.negative_slope == 0.01
    relu = mcibi_jax.Segmenter.from_pth(
        FIXTURES / "resnet50_cityscapes.pth", model_config_from_reference(meta["reference_config"])
    )
    leaky = mcibi_jax.Segmenter.from_pth(FIXTURES / "resnet50_cityscapes.pth", leaky_config)
    images = np.transpose(arrays["images_nchw"], (0, 2, 3, 1))
    # Every head module takes part: the logits move, the backbone (ReLU) does not.
    assert not np.allclose(
        relu.forward(images)["stage2"], leaky.forward(images)["stage2"], atol=1e-6
    )
    levels = [
        jax.jit(lambda v, x, s=s: s.model.apply(v, x, False, method=s.model.backbone_levels))(
            s.variables, images
        )
        for s in (relu, leaky)
    ]
    np.testing.assert_array_equal(levels[0][-1], levels[1][-1])
