"""What every MCIBI config shares: the backbones, the head, the data pipeline and the train /
eval settings, each with its one default.

``configs/<dataset>.py`` start from these and set what their recipe changes. Conventions:

* sizes are ``(height, width)``, except the resize bounds ``output_size``: a pair whose order
  does not matter (the image is scaled to fit its long side in the larger and its short side
  in the smaller);
* inference settings (``model.inference``, ``eval.tta_*``): ``mode`` 'whole' or 'slide'
  (``cropsize`` / ``stride`` as (h, w)), ``multiscale`` factors, ``flip``,
  ``use_probs_before_resize`` (average probabilities instead of logits over scales);
* learning rates are those of the global batch (``train.batch_size``).
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_LABEL = -100

# --------------------------------------------------------------------------------------------
# Backbones: options in the reference's words (``mcibi_jax.models.backbones.build_backbone``),
# the channels of the level the head reads, and the auxiliary heads on the levels before it,
# as (in_channels, num_convs, upsample_scale).

# scan_blocks (ours): True runs a stage's long run of identical blocks (ResNet-101's and
# ResNeSt-101's third stage) or HRNet's identical modules as one scan, which XLA compiles once
# (same parameters, same numbers); off in the recipes: XLA's loop holds more activation memory
# (R-101, 2x512x512: 26 %; docs/benchmarks.md).
BACKBONES: dict[str, dict[str, Any]] = {
    "r50": {
        "type": "ResNet",
        "depth": 50,
        "structure_type": "resnet50conv3x3stem",
        "outstride": 8,
        "use_conv3x3_stem": True,
        "selected_indices": (0, 1, 2, 3),
        "scan_blocks": False,
    },
    "r101": {
        "type": "ResNet",
        "depth": 101,
        "structure_type": "resnet101conv3x3stem",
        "outstride": 8,
        "use_conv3x3_stem": True,
        "selected_indices": (0, 1, 2, 3),
        "scan_blocks": False,
    },
    "s101": {
        "type": "ResNeSt",
        "depth": 101,
        "structure_type": "resnest101",
        "outstride": 8,
        "selected_indices": (0, 1, 2, 3),
        "scan_blocks": False,
    },
    "hrnet48": {
        # all four levels, concatenated at the highest resolution
        "type": "HRNet",
        "structure_type": "hrnetv2_w48",
        "arch": "hrnetv2_w48",
        "selected_indices": (0, 0, 0, 0),
        "scan_blocks": False,
    },
    "vitl": {
        "type": "VisionTransformer",
        "structure_type": "jx_vit_large_p16_384",
        "img_size": (512, 512),
        "out_indices": (9, 14, 19, 23),
        "norm_cfg": {"type": "LayerNorm", "eps": 1e-6},
        "selected_indices": (0, 1, 2, 3),
        "patch_size": 16,
        "embed_dims": 1024,
        "num_layers": 24,
        "num_heads": 16,
        "mlp_ratio": 4,
        "qkv_bias": True,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "with_cls_token": True,
        "output_cls_token": False,
        "patch_norm": False,
        "final_norm": False,
        "num_fcs": 2,
    },
}
HEAD_IN_CHANNELS = {
    "r50": 2048,
    "r101": 2048,
    "s101": 2048,
    "hrnet48": 48 + 96 + 192 + 384,
    "vitl": 1024,
}
AUXILIARY = {
    "r50": ((1024, 1, None),),
    "r101": ((1024, 1, None),),
    "s101": ((1024, 1, None),),
    "hrnet48": (),
    "vitl": ((1024, 2, 4), (1024, 2, 4), (1024, 2, 4)),
}
# ViT-L: a LayerNorm on each level before the head (model.head.level_norm_channels).
LEVEL_NORM_CHANNELS = {"vitl": [1024, 1024, 1024, 1024]}
# ViT-L: the backbone learns at a tenth of the rate (train.optimizer.param_rules).
VIT_PARAM_RULES = {"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 1.0}}


def check_backbone(dataset: str, arg: str, backbones: tuple[str, ...]) -> str:
    """``arg`` if it names a released backbone of ``dataset``, else a ValueError naming them."""
    if arg not in backbones:
        raise ValueError(
            f"no released MCIBI recipe for dataset {dataset!r} with backbone {arg!r}; "
            f"backbones for {dataset}: {', '.join(backbones)}"
        )
    return arg


# --------------------------------------------------------------------------------------------
# Model.


def head(
    *,
    in_channels: int,
    memory_base_lr: float,
    feats_channels: int = 512,
    transform_channels: int = 256,
    out_channels: int = 512,
) -> dict[str, Any]:
    """``config.model.head``: the MCIBI head (ASPP context, memory read, two classifiers)."""
    return {
        "in_channels": in_channels,
        "feats_channels": feats_channels,
        "transform_channels": transform_channels,
        "out_channels": out_channels,
        "num_feats_per_cls": 1,  # memory vectors per class
        "use_hard_aggregate": False,  # read the memory by argmax instead of softmax weights
        "dropout": 0.1,
        "negative_slope": 0.0,  # > 0: LeakyReLU in the head and the auxiliary heads
        "downsample_stride": 1,  # > 1: a strided conv on every backbone level first
        "context_dilations": [1, 12, 24, 36],  # ASPP rates ([]: no context within the image)
        "level_norm_channels": [],  # a LayerNorm per backbone level (ViT)
        "level_norm_eps": 1e-6,
        "use_memory_loss": False,  # classify the memory vectors too
        "memory_loss_weight": 1.0,
        "memory_update": {
            "strategy": "cosine_similarity",  # or 'mean'
            "ignore_label": IGNORE_LABEL,
            # momentum = base_momentum * lr_t / base_lr (lr_t: the current poly learning rate)
            "base_momentum": 0.9,
            "base_lr": memory_base_lr,
            "adjust_by_learning_rate": True,
        },
        # ours: recompute the head's activations in the backward pass from its convs' outputs
        "remat": False,
    }


def auxiliary(
    in_channels: int, num_convs: int = 1, upsample_scale: int | None = None, out_channels: int = 512
) -> dict[str, Any]:
    """One entry of ``config.model.auxiliary``: an FCN head on a backbone level before the last."""
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "dropout": 0.1,
        "num_convs": num_convs,
        "upsample_scale": upsample_scale,
    }


def whole(scales=(1,), flip: bool = False, probs: bool = False) -> dict[str, Any]:
    """Inference on the whole image, at each of ``scales``, and mirrored too with ``flip``."""
    return {
        "mode": "whole",
        "cropsize": [],
        "stride": [],
        "multiscale": list(scales),
        "flip": flip,
        "use_probs_before_resize": probs,
    }


def slide(crop, scales=(1,), flip: bool = False, probs: bool = True) -> dict[str, Any]:
    """Inference in ``crop``-sized windows 341 pixels apart, at each of ``scales``."""
    return {
        "mode": "slide",
        "cropsize": list(crop),
        "stride": [341, 341],
        "multiscale": list(scales),
        "flip": flip,
        "use_probs_before_resize": probs,
    }


def model(backbone: str, *, num_classes: int, memory_base_lr: float) -> ml_collections.ConfigDict:
    """``config.model`` of the released head on ``backbone`` (a key of BACKBONES)."""
    num_aux = len(AUXILIARY[backbone])
    return ml_collections.ConfigDict(
        {
            "num_classes": num_classes,
            "align_corners": False,
            # remat: recompute each block's activations in the backward pass (less memory, same numbers)
            "backbone": {**copy.deepcopy(BACKBONES[backbone]), "remat": False},
            "head": {
                **head(in_channels=HEAD_IN_CHANNELS[backbone], memory_base_lr=memory_base_lr),
                "level_norm_channels": list(LEVEL_NORM_CHANNELS.get(backbone, [])),
            },
            "auxiliary": [auxiliary(*aux) for aux in AUXILIARY[backbone]],
            "loss_weights": {"stage1": 0.4, "stage2": 1.0, "aux": [0.4] * num_aux},
            "inference": whole(),
        }
    )


# --------------------------------------------------------------------------------------------
# Data.


def dataset(
    name: str,
    *,
    num_classes: int,
    train_set: str,
    eval_set: str,
    output_size,
    crop_size,
    scale_range=(0.5, 2.0),
    test_size=None,
    keep_ratio: bool = True,
) -> ml_collections.ConfigDict:
    """``config.dataset``: where the data is and the train / test pipelines.

    Training: random scale of ``output_size`` by ``scale_range`` -> crop -> flip -> [rotate] ->
    photometric distortion -> normalise -> pad. Test: resize to ``test_size`` (default
    ``output_size``) -> normalise.
    """
    return ml_collections.ConfigDict(
        {
            "name": name,
            "num_classes": num_classes,
            "ignore_label": IGNORE_LABEL,
            "root": f"data/{name}",
            "train_set": train_set,
            "eval_set": eval_set,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "train": {
                "output_size": output_size,
                "keep_ratio": keep_ratio,
                "scale_range": scale_range,
                "crop_size": crop_size,
                "one_category_max_ratio": 0.75,  # recrop (up to 10 times) while one class fills more
                "flip_prob": 0.5,
                "flip_label_pairs": (),  # classes that swap when the image is mirrored
                "rotation_prob": 0.0,
                "rotation_max_angle": 0.0,
                "photometric_distortion": True,
                "pad_size": crop_size,
            },
            "test": {
                "output_size": output_size if test_size is None else test_size,
                "keep_ratio": keep_ratio,
            },
        }
    )


# --------------------------------------------------------------------------------------------
# Training and evaluation.


def train(
    *, batch_size: int, num_epochs: int, lr: float, weight_decay: float, min_lr: float | None = None
) -> ml_collections.ConfigDict:
    """``config.train``: SGD with momentum 0.9 and poly decay from ``lr`` to ``min_lr``
    (default lr / 100), per iteration, no warm-up."""
    return ml_collections.ConfigDict(
        {
            "batch_size": batch_size,
            "num_epochs": num_epochs,
            "optimizer": {
                "name": "sgd",
                "lr": lr,
                "momentum": 0.9,
                "weight_decay": weight_decay,
                # per parameter subtree, e.g. VIT_PARAM_RULES
                "param_rules": {},
            },
            # lr_t = (lr - min_lr) * (1 - t / T) ** power + min_lr
            "schedule": {
                "name": "poly",
                "power": 0.9,
                "min_lr": lr * 0.01 if min_lr is None else min_lr,
            },
            "seed": 0,
            "log_every": 50,  # iterations
            "checkpoint_every": 1,  # epochs
            "keep_checkpoints": 3,
            # evaluate dataset.eval_set every N epochs during training (0: only after training, in
            # --mode=train_and_eval); the best result is kept in WORKDIR/checkpoints/best
            "eval_every": 10,
            # The reference's data-parallel GPU count whose per-GPU losses and memory updates to
            # reproduce: its model zoo trains on 8 GPUs (1: one loss mean and one memory update
            # over the whole batch). Must divide batch_size; independent of our device count.
            "num_replicas": 8,
            # Start from these weights instead of a random initialisation (fine-tuning): an orbax
            # checkpoint directory (python -m mcibi_jax.port), a released .pth file, or a released
            # checkpoint by name, 'pretrained:ade20k:r50' (downloaded and cached, mcibi_jax.pretrained).
            "init_from": "",
            # Exponential moving average of the weights (0: off): ema = decay * ema + (1 - decay) * new;
            # the reference's EMA momentum m is decay = 1 - m. Export and evaluation then use it.
            "ema_decay": 0.0,
        }
    )


def evaluation(*, tta: dict[str, Any]) -> ml_collections.ConfigDict:
    """``config.eval``; ``tta``: the multi-scale / flip inference settings of ``eval.use_tta``."""
    return ml_collections.ConfigDict(
        {
            "batch_size": 1,
            # False: evaluate with model.inference; True: with the tta_* settings below.
            "use_tta": False,
            **{f"tta_{key}": value for key, value in tta.items()},
            "save_confusion": True,  # WORKDIR/confusion.{csv,png}
            # True: write the predictions for the dataset's evaluation server instead of scoring.
            "format_only": False,
            # --mode=eval scores: '' the newest exported checkpoint, 'best', or a checkpoint directory
            "checkpoint": "",
        }
    )


def experiment(
    name: str,
    *,
    model: ml_collections.ConfigDict,
    dataset: ml_collections.ConfigDict,
    train: ml_collections.ConfigDict,
    evaluation: ml_collections.ConfigDict,
    dtype: str = "float32",
) -> ml_collections.ConfigDict:
    """The experiment config: ``name``, ``model``, ``dataset``, ``train``, ``eval`` and the
    compute ``dtype`` ('float32' or 'bfloat16'; parameters, memory and statistics stay float32)."""
    return ml_collections.ConfigDict(
        {
            "name": name,
            "model": model,
            "dataset": dataset,
            "train": train,
            "eval": evaluation,
            "dtype": dtype,
        }
    )
