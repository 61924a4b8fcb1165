"""MCIBI on COCO-Stuff-10k (182 classes; train / test), 512x512 crops.

    python -m mcibi_jax.main --config=configs/cocostuff10k.py:r50 --workdir=DIR \\
        --config.dataset.root=data/cocostuff10k

Args (``configs/cocostuff10k.py:<arg>``): the backbones of PUBLISHED_MIOU below.
``--config.eval.use_tta=True`` evaluates multi-scale + flip (``eval.tta_*``).
"""

import ml_collections

from mcibi_jax.configs import common

# Published test mIoU (%) of the released checkpoints: (single-scale, multi-scale + flip).
PUBLISHED_MIOU = {
    "r50": (38.84, 39.78),  # ResNet-50-D8
    "r101": (39.84, 41.52),  # ResNet-101-D8
    "s101": (41.18, 42.38),  # ResNeSt-101-D8
    "hrnet48": (39.77, 41.48),  # HRNetV2p-W48
    "vitl": (44.27, 45.50),  # ViT-Large (p16)
}
BACKBONES = tuple(PUBLISHED_MIOU)
FIVE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
SIX_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    backbone = common.check_backbone("cocostuff10k", arg, BACKBONES)
    lr = 0.001
    vit = backbone == "vitl"

    # memory momentum 0.9 * lr_t / (0.9 * lr): 1 at the start
    model = common.model(backbone, num_classes=182, memory_base_lr=lr * 0.9)
    if vit:
        model.inference = common.slide((512, 512))

    dataset = common.dataset(
        "cocostuff10k",
        num_classes=182,
        train_set="train",
        eval_set="test",
        output_size=(2048, 512),  # random scale 0.5-2 of "long side 2048, short side 512"
        scale_range=(0.5, 2.0),
        crop_size=(512, 512),
    )
    if backbone == "s101":  # batch 32 for 150 epochs, decaying to lr / 10
        train = common.train(batch_size=32, num_epochs=150, lr=lr, weight_decay=5e-4, min_lr=1e-4)
    else:  # 110 epochs of the 9000 training images
        train = common.train(
            batch_size=16, num_epochs=110, lr=lr, weight_decay=0.0 if vit else 1e-4
        )
    if vit:
        train.optimizer.param_rules = common.VIT_PARAM_RULES

    if vit:
        tta = common.slide((512, 512), SIX_SCALES, flip=True)
    elif backbone == "hrnet48":
        tta = common.slide((512, 512), FIVE_SCALES, flip=True)
    else:  # the released r101 evaluates at six scales, r50 and s101 at five
        tta = common.whole(SIX_SCALES if backbone == "r101" else FIVE_SCALES, flip=True, probs=True)
    return common.experiment(
        f"mcibi_{backbone}_cocostuff10k",
        model=model,
        dataset=dataset,
        train=train,
        evaluation=common.evaluation(tta=tta),
    )
