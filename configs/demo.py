"""A small MCIBI trained from scratch on generated scenes (no data download, CPU friendly).

    python -m mcibi_jax.main --config=configs/demo.py --workdir=/tmp/demo

Same layout as the released recipes (``model``, ``dataset``, ``train``, ``eval``, ``dtype``):
a ResNet-18-D8 with narrow stages (16-32-64-128 channels), a narrow MCIBI head and 4 classes
(background + 3 textured shape classes) on 64x64 images, see ``mcibi_jax.data.synthetic``.
1280 steps of batch 8 from scratch: about 1.5-2 minutes on 2 CPU cores, held-out mIoU 78-83 %
(predicting background everywhere scores about 17 %; 6 epochs instead of 10 reach only 75 %).
"""

import ml_collections

from mcibi_jax.configs import common
from mcibi_jax.data import synthetic

NUM_CLASSES = 4
IMAGE_SIZE = (64, 64)


def get_config() -> ml_collections.ConfigDict:
    lr = 0.02
    model = ml_collections.ConfigDict(
        {
            "num_classes": NUM_CLASSES,
            "align_corners": False,
            "backbone": {
                "type": "ResNet",
                "depth": 18,
                "structure_type": "resnet18conv3x3stem",
                "outstride": 8,
                "use_conv3x3_stem": True,
                "base_channels": 16,
                "stem_channels": 16,
                "selected_indices": (0, 1, 2, 3),
                "remat": False,
            },
            "head": common.head(
                in_channels=128,
                feats_channels=64,
                transform_channels=32,
                out_channels=64,
                memory_base_lr=lr,
            ),
            "auxiliary": [common.auxiliary(64, out_channels=64)],
            "loss_weights": {"stage1": 0.4, "stage2": 1.0, "aux": [0.4]},
            "inference": common.whole(),
        }
    )
    # the head sees 8x8 maps: small rates instead of the released (1, 12, 24, 36)
    model.head.context_dilations = [1, 2, 3, 4]
    model.head.use_memory_loss = True  # exercised here (the released recipes: ADE20k only)

    dataset = ml_collections.ConfigDict(
        {
            "name": "synthetic",
            "num_classes": NUM_CLASSES,
            "ignore_label": common.IGNORE_LABEL,
            "image_size": IMAGE_SIZE,
            "train_set": "train",
            "eval_set": "test",
            # generated once per split; the seed makes a split, the class statistics are fixed
            "train": {"num_images": 1024, "seed": 0, "flip_prob": 0.5, "flip_label_pairs": ()},
            # output_size None: the test pipeline (predict, export) keeps an image's size
            "test": {"num_images": 128, "seed": 1, "output_size": None, "keep_ratio": True},
            # the generated images are (rgb / 255 - synthetic.MEAN) / synthetic.STD
            "mean": (255 * synthetic.MEAN,) * 3,
            "std": (255 * synthetic.STD,) * 3,
        }
    )
    train = common.train(batch_size=8, num_epochs=10, lr=lr, weight_decay=5e-4)
    train.log_every = 32
    train.eval_every = 5  # epochs; the best evaluation is kept in WORKDIR/checkpoints/best
    train.num_replicas = 1
    evaluation = ml_collections.ConfigDict(
        {
            "batch_size": 16,
            "use_tta": False,
            "save_confusion": True,
            "format_only": False,
            "checkpoint": "",
        }
    )
    return common.experiment(
        "mcibi_r18_synthetic_demo", model=model, dataset=dataset, train=train, evaluation=evaluation
    )
