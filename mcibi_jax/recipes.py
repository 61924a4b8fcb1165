"""The 18 released MCIBI recipes as data: model, data pipeline, optimisation and evaluation.

``released_config(dataset, backbone)`` assembles one experiment config from the tables
below. ``config.model`` is exactly what :func:`mcibi_jax.reference_config.model_config_from_reference`
gives for the authors' released config, so the released checkpoints port onto it strictly.

Conventions of the data tables:

* sizes are ``(height, width)``; resize bounds are a pair whose order does not matter
  (the image is scaled to fit the long side in the larger and the short side in the smaller);
* ``inference`` / ``tta`` follow the ``config.model.inference`` schema: ``mode`` 'whole' or
  'slide' (``cropsize``/``stride`` as (h, w)), ``multiscale`` factors, ``flip``,
  ``use_probs_before_resize``;
* learning rates are those of the global batch (``train.batch_size``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

DATASETS = ("cityscapes", "ade20k", "cocostuff10k", "lip")
BACKBONES = ("r50", "r101", "s101", "hrnet48", "vitl")

# --------------------------------------------------------------------------------------------
# Datasets: what the data pipelines need, and the head settings that depend only on the dataset.

_IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255
_IMAGENET_STD = (58.395, 57.12, 57.375)

_DATASET_TABLE: dict[str, dict[str, Any]] = {
    "cityscapes": {
        "num_classes": 19,
        "train_set": "trainval",
        "eval_set": "test",
        "resize": (2048, 1024),
        "keep_ratio": True,
        "scale_range": (0.5, 2.0),
        "crop": (512, 1024),
        "test_resize": (2048, 1024),
    },
    "ade20k": {
        "num_classes": 150,
        "train_set": "train",
        "eval_set": "val",
        "resize": (2048, 512),
        "keep_ratio": True,
        "scale_range": (0.5, 2.0),
        "crop": (512, 512),
        "test_resize": (2048, 512),
    },
    "cocostuff10k": {
        "num_classes": 182,
        "train_set": "train",
        "eval_set": "test",
        "resize": (2048, 512),
        "keep_ratio": True,
        "scale_range": (0.5, 2.0),
        "crop": (512, 512),
        "test_resize": (2048, 512),
    },
    "lip": {
        "num_classes": 20,
        "train_set": "train",
        "eval_set": "val",
        "resize": (520, 520),
        "keep_ratio": False,
        "scale_range": (0.75, 1.25),
        "crop": (473, 473),
        "test_resize": (473, 473),
        # left/right body parts swap their labels when the image is mirrored
        "flip_label_pairs": ((15, 14), (17, 16), (19, 18)),
        "rotation_prob": 0.6,
        "rotation_max_angle": 30.0,
    },
}

# The memory loss is only used for ADE20k.
_MEMORY_LOSS = {"cityscapes": False, "ade20k": True, "cocostuff10k": False, "lip": False}
# Memory momentum = base_momentum * lr_t / base_lr (lr_t: the current poly learning rate), with
# base_lr = the recipe's lr times this factor; where it is 0.9 the momentum starts at exactly 1.
_MEMORY_BASE_LR_FACTOR = {"cityscapes": 0.9, "ade20k": 1.0, "cocostuff10k": 0.9, "lip": 1.0}

# --------------------------------------------------------------------------------------------
# Backbones: options in the reference's words (fed to ``build_backbone``) and the head/aux
# layout that goes with them.

_RESNET_LEVELS = (0, 1, 2, 3)
_BACKBONE_TABLE: dict[str, dict[str, Any]] = {
    "r50": {
        "options": {
            "type": "ResNet", "depth": 50, "structure_type": "resnet50conv3x3stem",
            "outstride": 8, "use_conv3x3_stem": True, "selected_indices": _RESNET_LEVELS,
        },
        "head_in_channels": 2048,
        "aux": ((1024, 1, None),),  # (in_channels, num_convs, upsample_scale) per aux head
    },
    "r101": {
        "options": {
            "type": "ResNet", "depth": 101, "structure_type": "resnet101conv3x3stem",
            "outstride": 8, "use_conv3x3_stem": True, "selected_indices": _RESNET_LEVELS,
        },
        "head_in_channels": 2048,
        "aux": ((1024, 1, None),),
    },
    "s101": {
        "options": {
            "type": "ResNeSt", "depth": 101, "structure_type": "resnest101",
            "outstride": 8, "selected_indices": _RESNET_LEVELS,
        },
        "head_in_channels": 2048,
        "aux": ((1024, 1, None),),
    },
    "hrnet48": {
        "options": {
            "type": "HRNet", "structure_type": "hrnetv2_w48", "arch": "hrnetv2_w48",
            "selected_indices": (0, 0, 0, 0),
        },
        "head_in_channels": 48 + 96 + 192 + 384,
        "aux": (),
    },
    "vitl": {
        "options": {
            "type": "VisionTransformer", "structure_type": "jx_vit_large_p16_384", "img_size": (512, 512),
            "out_indices": (9, 14, 19, 23), "norm_cfg": {"type": "LayerNorm", "eps": 1e-6},
            "selected_indices": (0, 1, 2, 3), "patch_size": 16, "embed_dims": 1024, "num_layers": 24,
            "num_heads": 16, "mlp_ratio": 4, "qkv_bias": True, "drop_rate": 0.0, "attn_drop_rate": 0.0,
            "drop_path_rate": 0.0, "with_cls_token": True, "output_cls_token": False, "patch_norm": False,
            "final_norm": False, "num_fcs": 2,
        },
        "head_in_channels": 1024,
        "level_norm_channels": (1024, 1024, 1024, 1024),
        "level_norm_eps": 1e-6,
        "aux": ((1024, 2, 4), (1024, 2, 4), (1024, 2, 4)),
    },
}

# --------------------------------------------------------------------------------------------
# Inference settings.


def _whole(scales=(1,), flip=False, probs=False) -> dict[str, Any]:
    return {"mode": "whole", "cropsize": [], "stride": [], "multiscale": list(scales), "flip": flip,
            "use_probs_before_resize": probs}


def _slide(crop, scales=(1,), flip=False, probs=True) -> dict[str, Any]:
    return {"mode": "slide", "cropsize": list(crop), "stride": [341, 341], "multiscale": list(scales),
            "flip": flip, "use_probs_before_resize": probs}


_SIX_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
_FIVE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
# Cityscapes evaluates with tall 1024x512 windows (the reference's (h, w) order) on 1024x2048 images.
_CITYSCAPES_MS_FLIP = _slide((1024, 512), _SIX_SCALES, flip=True)

# --------------------------------------------------------------------------------------------
# The recipes. ``inference``: the released single-scale setting (for Cityscapes the released
# setting is already multi-scale + flip); ``tta``: the multi-scale/flip alternative of the
# release. Optional keys: ``min_lr`` (default lr / 100), ``downsample_stride`` (default 1),
# ``aspp_dilations`` (default 1, 12, 24, 36), ``param_rules``, ``backbone_options`` (added to the
# backbone's).

_VIT_PARAM_RULES = {"backbone_net": {"lr_multiplier": 0.1, "wd_multiplier": 1.0}}

_RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("cityscapes", "r50"): dict(batch_size=16, epochs=440, lr=0.01, weight_decay=5e-4,
                                inference=_CITYSCAPES_MS_FLIP, tta=_CITYSCAPES_MS_FLIP),
    ("cityscapes", "r101"): dict(batch_size=16, epochs=440, lr=0.01, weight_decay=5e-4,
                                 inference=_CITYSCAPES_MS_FLIP, tta=_CITYSCAPES_MS_FLIP),
    ("cityscapes", "s101"): dict(batch_size=16, epochs=500, lr=0.01, weight_decay=5e-4,
                                 inference=_CITYSCAPES_MS_FLIP, tta=_CITYSCAPES_MS_FLIP),
    ("cityscapes", "hrnet48"): dict(batch_size=16, epochs=500, lr=0.01, weight_decay=5e-4, downsample_stride=2,
                                    backbone_options={"mcibi_version": True},
                                    inference=_CITYSCAPES_MS_FLIP, tta=_CITYSCAPES_MS_FLIP),
    ("ade20k", "r50"): dict(batch_size=16, epochs=130, lr=0.01, weight_decay=5e-4,
                            inference=_whole(), tta=_whole(_SIX_SCALES, flip=True, probs=True)),
    ("ade20k", "r101"): dict(batch_size=16, epochs=130, lr=0.01, weight_decay=5e-4,
                             inference=_whole(), tta=_whole(_SIX_SCALES, flip=True, probs=True)),
    ("ade20k", "s101"): dict(batch_size=16, epochs=180, lr=0.004, weight_decay=5e-4,
                             inference=_whole(), tta=_whole(_SIX_SCALES, flip=True, probs=True)),
    ("ade20k", "hrnet48"): dict(batch_size=16, epochs=180, lr=0.004, weight_decay=5e-4,
                                inference=_whole(), tta=_slide((512, 512), _SIX_SCALES, flip=True)),
    ("ade20k", "vitl"): dict(batch_size=16, epochs=130, lr=0.01, weight_decay=0.0, param_rules=_VIT_PARAM_RULES,
                             aspp_dilations=(1, 6, 12, 18),
                             inference=_slide((512, 512)), tta=_slide((512, 512), _SIX_SCALES, flip=True)),
    ("cocostuff10k", "r50"): dict(batch_size=16, epochs=110, lr=0.001, weight_decay=1e-4,
                                  inference=_whole(), tta=_whole(_FIVE_SCALES, flip=True, probs=True)),
    ("cocostuff10k", "r101"): dict(batch_size=16, epochs=110, lr=0.001, weight_decay=1e-4,
                                   inference=_whole(), tta=_whole(_SIX_SCALES, flip=True, probs=True)),
    ("cocostuff10k", "s101"): dict(batch_size=32, epochs=150, lr=0.001, weight_decay=5e-4, min_lr=1e-4,
                                   inference=_whole(), tta=_whole(_FIVE_SCALES, flip=True, probs=True)),
    ("cocostuff10k", "hrnet48"): dict(batch_size=16, epochs=110, lr=0.001, weight_decay=1e-4,
                                      inference=_whole(), tta=_slide((512, 512), _FIVE_SCALES, flip=True)),
    ("cocostuff10k", "vitl"): dict(batch_size=16, epochs=110, lr=0.001, weight_decay=0.0, param_rules=_VIT_PARAM_RULES,
                                   inference=_slide((512, 512)), tta=_slide((512, 512), _SIX_SCALES, flip=True)),
    ("lip", "r50"): dict(batch_size=32, epochs=150, lr=0.01, weight_decay=5e-4,
                         inference=_whole(), tta=_whole(flip=True)),
    ("lip", "r101"): dict(batch_size=32, epochs=150, lr=0.01, weight_decay=5e-4,
                          inference=_whole(), tta=_whole(flip=True)),
    ("lip", "s101"): dict(batch_size=40, epochs=150, lr=0.007, weight_decay=5e-4,
                          inference=_whole(), tta=_whole(flip=True)),
    ("lip", "hrnet48"): dict(batch_size=40, epochs=150, lr=0.007, weight_decay=5e-4, downsample_stride=2,
                             inference=_whole(), tta=_whole(flip=True)),
}

RELEASED: list[tuple[str, str]] = list(_RECIPES)

# Released checkpoint layouts: ``tests/reference/keys/<name>.txt``.
_KEYS_PREFIX = {"r50": "resnet50os8", "r101": "resnet101os8", "s101": "resnest101os8",
                "hrnet48": "hrnetv2w48", "vitl": "vitlarge"}
KEYS_FILES: dict[tuple[str, str], str] = {(d, b): f"{_KEYS_PREFIX[b]}_{d}" for d, b in RELEASED}

# The reference trains these two with LeakyReLU(0.01) in every head and auxiliary activation
# (the backbone keeps ReLU): model.head.negative_slope.
_HEAD_NEGATIVE_SLOPE: dict[tuple[str, str], float] = {("lip", "r50"): 0.01, ("lip", "r101"): 0.01}

# Single-scale / multi-scale(+flip) mIoU (%) published with the checkpoints.
PUBLISHED_MIOU: dict[tuple[str, str], tuple[float | None, float]] = {
    ("cityscapes", "r50"): (None, 79.97), ("cityscapes", "r101"): (None, 82.10),
    ("cityscapes", "s101"): (None, 81.51), ("cityscapes", "hrnet48"): (None, 82.54),
    ("ade20k", "r50"): (44.39, 45.97), ("ade20k", "r101"): (45.66, 47.27), ("ade20k", "s101"): (46.63, 47.39),
    ("ade20k", "hrnet48"): (45.79, 47.46), ("ade20k", "vitl"): (50.08, 51.63),
    ("cocostuff10k", "r50"): (38.84, 39.78), ("cocostuff10k", "r101"): (39.84, 41.52),
    ("cocostuff10k", "s101"): (41.18, 42.38), ("cocostuff10k", "hrnet48"): (39.77, 41.48),
    ("cocostuff10k", "vitl"): (44.27, 45.50),
    ("lip", "r50"): (53.73, 54.08), ("lip", "r101"): (55.02, 55.42), ("lip", "s101"): (56.21, 56.34),
    ("lip", "hrnet48"): (56.40, 56.99),
}


def _copy(value: Any) -> Any:
    """Fresh lists/dicts (tuples stay tuples), so configs never share mutable state."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _model(dataset: str, backbone: str, recipe: dict[str, Any]) -> dict[str, Any]:
    data, net = _DATASET_TABLE[dataset], _BACKBONE_TABLE[backbone]
    num_aux = len(net["aux"])
    return {
        "num_classes": data["num_classes"],
        "align_corners": False,
        # remat: recompute each block's activations in the backward pass (less memory, same numbers)
        "backbone": {**_copy(net["options"]), **recipe.get("backbone_options", {}), "remat": False},
        "head": {
            "in_channels": net["head_in_channels"],
            "feats_channels": 512,
            "transform_channels": 256,
            "out_channels": 512,
            "num_feats_per_cls": 1,
            "use_hard_aggregate": False,
            "dropout": 0.1,
            "negative_slope": _HEAD_NEGATIVE_SLOPE.get((dataset, backbone), 0.0),
            "downsample_stride": recipe.get("downsample_stride", 1),
            "context_dilations": list(recipe.get("aspp_dilations", (1, 12, 24, 36))),
            "level_norm_channels": list(net.get("level_norm_channels", ())),
            "level_norm_eps": net.get("level_norm_eps", 1e-6),
            "use_memory_loss": _MEMORY_LOSS[dataset],
            "memory_loss_weight": 1.0,
            "update": {
                "strategy": "cosine_similarity",
                "ignore_label": -100,
                "base_momentum": 0.9,
                "base_lr": recipe["lr"] * _MEMORY_BASE_LR_FACTOR[dataset],
                "adjust_by_learning_rate": True,
            },
        },
        "auxiliary": [
            {"in_channels": c, "out_channels": 512, "dropout": 0.1, "num_convs": n, "upsample_scale": s}
            for c, n, s in net["aux"]
        ],
        "loss_weights": {"stage1": 0.4, "stage2": 1.0, "aux": [0.4] * num_aux},
        "inference": _copy(recipe["inference"]),
    }


def _dataset(dataset: str) -> dict[str, Any]:
    data = _DATASET_TABLE[dataset]
    return {
        "name": dataset,
        "num_classes": data["num_classes"],
        "ignore_label": -100,
        "root": f"data/{dataset}",
        "train_set": data["train_set"],
        "eval_set": data["eval_set"],
        "mean": _IMAGENET_MEAN,
        "std": _IMAGENET_STD,
        # resize (random scale) -> crop -> flip -> [rotate] -> photometric distortion -> normalise -> pad
        "train": {
            "output_size": data["resize"],
            "keep_ratio": data["keep_ratio"],
            "scale_range": data["scale_range"],
            "crop_size": data["crop"],
            "one_category_max_ratio": 0.75,
            "flip_prob": 0.5,
            "flip_label_pairs": data.get("flip_label_pairs", ()),
            "rotation_prob": data.get("rotation_prob", 0.0),
            "rotation_max_angle": data.get("rotation_max_angle", 0.0),
            "photometric_distortion": True,
            "pad_size": data["crop"],
        },
        # resize -> normalise (no random scale)
        "test": {"output_size": data["test_resize"], "keep_ratio": data["keep_ratio"]},
    }


def _train(recipe: dict[str, Any]) -> dict[str, Any]:
    lr = recipe["lr"]
    return {
        "batch_size": recipe["batch_size"],
        "num_epochs": recipe["epochs"],
        "optimizer": {
            "name": "sgd",
            "lr": lr,
            "momentum": 0.9,
            "weight_decay": recipe["weight_decay"],
            "param_rules": _copy(recipe.get("param_rules", {})),
        },
        # lr_t = (lr - min_lr) * (1 - t / T) ** power + min_lr, per iteration, no warm-up
        "schedule": {"name": "poly", "power": 0.9, "min_lr": recipe.get("min_lr", lr * 0.01)},
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


def _eval(recipe: dict[str, Any]) -> dict[str, Any]:
    tta = recipe["tta"]
    return {
        "batch_size": 1,
        # False: evaluate with model.inference; True: with the tta_* settings below.
        "use_tta": False,
        **{f"tta_{k}": _copy(v) for k, v in tta.items()},
        "save_confusion": True,  # WORKDIR/confusion.{csv,png}
        # True: write the predictions for the dataset's evaluation server instead of scoring.
        "format_only": False,
        # --mode=eval scores: '' the newest exported checkpoint, 'best', or a checkpoint directory
        "checkpoint": "",
    }


def released_config(dataset: str, backbone: str) -> ml_collections.ConfigDict:
    """Experiment config of a released MCIBI recipe, e.g. ``released_config("cityscapes", "r50")``.

    Top-level keys: ``model`` (see :mod:`mcibi_jax.reference_config`), ``dataset``, ``train``,
    ``eval``, ``dtype``.
    """
    key = (dataset, backbone)
    if key not in _RECIPES:
        backbones = [b for d, b in RELEASED if d == dataset]
        choices = (f"backbones for {dataset}: {', '.join(backbones)}" if backbones
                   else f"datasets: {', '.join(DATASETS)}")
        raise ValueError(f"no released MCIBI recipe for dataset {dataset!r} with backbone {backbone!r}; {choices}")
    recipe = _RECIPES[key]
    return ml_collections.ConfigDict(
        {
            "name": f"mcibi_{backbone}_{dataset}",
            "model": _model(dataset, backbone, recipe),
            "dataset": _dataset(dataset),
            "train": _train(recipe),
            "eval": _eval(recipe),
            "dtype": "float32",
        }
    )


__all__ = ["BACKBONES", "DATASETS", "KEYS_FILES", "PUBLISHED_MIOU", "RELEASED",
           "released_config"]
