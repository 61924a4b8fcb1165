"""MCIBI on Cityscapes (19 classes; trained on train+val, evaluated on test), 512x1024 crops.

    python -m mcibi_jax.main --config=configs/cityscapes.py:r50 --workdir=DIR \\
        --config.dataset.root=data/cityscapes

Args (``configs/cityscapes.py:<arg>``): the backbones of PUBLISHED_MIOU below. The released
evaluation (``model.inference``) is already multi-scale + flip, so ``eval.use_tta`` changes
nothing here.
"""

import ml_collections

from mcibi_jax.configs import common

# Published test mIoU (%) of the released checkpoints: (single-scale, multi-scale + flip); only
# the multi-scale + flip number is published.
PUBLISHED_MIOU = {
    "r50": (None, 79.97),  # ResNet-50-D8
    "r101": (None, 82.10),  # ResNet-101-D8
    "s101": (None, 81.51),  # ResNeSt-101-D8
    "hrnet48": (None, 82.54),  # HRNetV2p-W48
}
BACKBONES = tuple(PUBLISHED_MIOU)
NUM_EPOCHS = {"r50": 440, "r101": 440, "s101": 500, "hrnet48": 500}  # of 2975 + 500 images
SIX_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    backbone = common.check_backbone("cityscapes", arg, BACKBONES)
    lr = 0.01

    # memory momentum 0.9 * lr_t / (0.9 * lr): 1 at the start
    model = common.model(backbone, num_classes=19, memory_base_lr=lr * 0.9)
    # Tall 1024x512 windows ((h, w), as the reference has them) on 1024x2048 images.
    model.inference = common.slide((1024, 512), SIX_SCALES, flip=True)
    if backbone == "hrnet48":
        model.backbone.mcibi_version = True  # no ReLU after the stem's first BN (as released)
        model.head.downsample_stride = 2

    dataset = common.dataset(
        "cityscapes",
        num_classes=19,
        train_set="trainval",
        eval_set="test",
        output_size=(2048, 1024),  # random scale 0.5-2 of 2048x1024 (the full image)
        scale_range=(0.5, 2.0),
        crop_size=(512, 1024),
    )
    train = common.train(batch_size=16, num_epochs=NUM_EPOCHS[backbone], lr=lr, weight_decay=5e-4)
    evaluation = common.evaluation(tta=common.slide((1024, 512), SIX_SCALES, flip=True))
    return common.experiment(
        f"mcibi_{backbone}_cityscapes",
        model=model,
        dataset=dataset,
        train=train,
        evaluation=evaluation,
    )
