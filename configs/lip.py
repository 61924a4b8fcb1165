"""MCIBI on LIP (human parsing: 20 classes; train / val), 473x473 crops.

    python -m mcibi_jax.main --config=configs/lip.py:r50 --workdir=DIR \\
        --config.dataset.root=data/lip

Args (``configs/lip.py:<arg>``): the backbones of PUBLISHED_MIOU below.
``--config.eval.use_tta=True`` evaluates with flip (``eval.tta_*``).
"""

import ml_collections

from mcibi_jax.configs import common

# Published val mIoU (%) of the released checkpoints: (single-scale, with flip).
PUBLISHED_MIOU = {
    "r50": (53.73, 54.08),  # ResNet-50-D8
    "r101": (55.02, 55.42),  # ResNet-101-D8
    "s101": (56.21, 56.34),  # ResNeSt-101-D8
    "hrnet48": (56.40, 56.99),  # HRNetV2p-W48
}
BACKBONES = tuple(PUBLISHED_MIOU)
# (global batch size, learning rate); all train 150 epochs of the 30462 training images
SCHEDULE = {"r50": (32, 0.01), "r101": (32, 0.01), "s101": (40, 0.007), "hrnet48": (40, 0.007)}


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    backbone = common.check_backbone("lip", arg, BACKBONES)
    batch_size, lr = SCHEDULE[backbone]

    model = common.model(backbone, num_classes=20, memory_base_lr=lr)
    if backbone in ("r50", "r101"):
        # released with LeakyReLU(0.01) in the head and auxiliary head (the backbone keeps ReLU)
        model.head.negative_slope = 0.01
    if backbone == "hrnet48":
        model.head.downsample_stride = 2

    dataset = common.dataset(
        "lip",
        num_classes=20,
        train_set="train",
        eval_set="val",
        output_size=(520, 520),
        keep_ratio=False,  # random scale 0.75-1.25 of 520x520, stretched
        scale_range=(0.75, 1.25),
        crop_size=(473, 473),
        test_size=(473, 473),
    )
    dataset.train.flip_label_pairs = ((15, 14), (17, 16), (19, 18))  # left/right arm, leg, shoe
    dataset.train.rotation_prob = 0.6
    dataset.train.rotation_max_angle = 30.0

    train = common.train(batch_size=batch_size, num_epochs=150, lr=lr, weight_decay=5e-4)
    return common.experiment(
        f"mcibi_{backbone}_lip",
        model=model,
        dataset=dataset,
        train=train,
        evaluation=common.evaluation(tta=common.whole(flip=True)),
    )
