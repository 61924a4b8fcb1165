"""MCIBI on ADE20k (150 classes; train / val), 512x512 crops.

    python -m mcibi_jax.main --config=configs/ade20k.py:r50 --workdir=DIR \\
        --config.dataset.root=data/ade20k

Args (``configs/ade20k.py:<arg>``): the backbones of PUBLISHED_MIOU below.
``--config.eval.use_tta=True`` evaluates multi-scale + flip (``eval.tta_*``).
"""

import ml_collections

from mcibi_jax.configs import common

# Published val mIoU (%) of the released checkpoints: (single-scale, multi-scale + flip).
PUBLISHED_MIOU = {
    "r50": (44.39, 45.97),  # ResNet-50-D8
    "r101": (45.66, 47.27),  # ResNet-101-D8
    "s101": (46.63, 47.39),  # ResNeSt-101-D8
    "hrnet48": (45.79, 47.46),  # HRNetV2p-W48
    "vitl": (50.08, 51.63),  # ViT-Large (p16)
}
BACKBONES = tuple(PUBLISHED_MIOU)
# (epochs of the 20210 training images, learning rate)
SCHEDULE = {
    "r50": (130, 0.01),
    "r101": (130, 0.01),
    "s101": (180, 0.004),
    "hrnet48": (180, 0.004),
    "vitl": (130, 0.01),
}
SIX_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_config(arg: str = "r50") -> ml_collections.ConfigDict:
    backbone = common.check_backbone("ade20k", arg, BACKBONES)
    num_epochs, lr = SCHEDULE[backbone]
    vit = backbone == "vitl"

    model = common.model(backbone, num_classes=150, memory_base_lr=lr)
    model.head.use_memory_loss = True  # ADE20k is the one dataset trained with the memory loss
    if vit:
        model.head.context_dilations = [1, 6, 12, 18]
        model.inference = common.slide((512, 512))

    dataset = common.dataset(
        "ade20k",
        num_classes=150,
        train_set="train",
        eval_set="val",
        output_size=(2048, 512),  # random scale 0.5-2 of "long side 2048, short side 512"
        scale_range=(0.5, 2.0),
        crop_size=(512, 512),
    )
    train = common.train(
        batch_size=16, num_epochs=num_epochs, lr=lr, weight_decay=0.0 if vit else 5e-4
    )
    if vit:
        train.optimizer.param_rules = common.VIT_PARAM_RULES
    if vit or backbone == "hrnet48":
        tta = common.slide((512, 512), SIX_SCALES, flip=True)
    else:
        tta = common.whole(SIX_SCALES, flip=True, probs=True)
    return common.experiment(
        f"mcibi_{backbone}_ade20k",
        model=model,
        dataset=dataset,
        train=train,
        evaluation=common.evaluation(tta=tta),
    )
