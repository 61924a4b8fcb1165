"""model.backbone.remat and model.head.remat (activation rematerialisation) change no number:
outputs, gradients and BatchNorm statistics of every backbone, and of the head, are those without
them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcibi_jax.config import load_config
from mcibi_jax.models.backbones import build_backbone, hrnet, resnest, resnet
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.models.settings import head_of
from mcibi_jax.recipes import BACKBONES
from tests.helpers import load_script

xla_stats = load_script("benchmarks", "xla_stats")

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "ResNet": {
        "type": "ResNet",
        "depth": 18,
        "base_channels": 4,
        "stem_channels": 8,
        "outstride": 8,
    },
    "ResNeSt": {
        "type": "ResNeSt",
        "depth": 50,
        "base_channels": 4,
        "stem_channels": 8,
        "outstride": 8,
    },
    "HRNet": {"type": "HRNet", "arch": "hrnetv2_tiny", "mcibi_version": True},
    "VisionTransformer": {
        "type": "VisionTransformer",
        "img_size": (32, 32),
        "patch_size": 8,
        "embed_dims": 16,
        "num_layers": 3,
        "num_heads": 2,
        "out_indices": (0, 1, 2),
        "drop_path_rate": 0.1,
    },
}
# Fewer blocks per stage (quicker compiles); the last stage keeps two, so blocks without a
# projection are rematerialised too. HRNet: one module per stage (the branches and fuse layers
# are the same as in the fixtures' two).
FEWER_BLOCKS = {
    "ResNet": (resnet.ARCH_SETTINGS, 18, ("basic", (1, 1, 1, 2))),
    "ResNeSt": (resnest.ARCH_SETTINGS, 50, (1, 1, 1, 2)),
    "HRNet": (
        hrnet.ARCH_SETTINGS,
        "hrnetv2_tiny",
        tuple(dataclasses.replace(s, num_modules=1) for s in hrnet.ARCH_SETTINGS["hrnetv2_tiny"]),
    ),
}


def _train_value_and_grad(model, variables: dict, images: jax.Array, outputs_to_sum, **kwargs):
    """jax.value_and_grad (not yet jitted) of the sum of sin of ``outputs_to_sum(outputs)``
    over the parameters, in training mode; its aux: the outputs and the new statistics."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        outputs, updates = model.apply(
            {"params": params, **rest},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(1)},
            **kwargs,
        )
        leaves = jax.tree_util.tree_leaves(outputs_to_sum(outputs))
        value = sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in leaves)
        return value, (outputs, updates)

    return jax.value_and_grad(loss, has_aux=True)


def _loss_grads_stats(options: dict, remat: bool, images: jax.Array, variables: dict):
    model = build_backbone({**options, "remat": remat})
    step = _train_value_and_grad(model, variables, images, lambda outputs: outputs)
    (value, (outputs, updates)), grads = jax.jit(step)(variables["params"])
    return model, value, outputs, updates, grads


@pytest.mark.parametrize("name", list(TINY))
def test_remat_changes_no_number(name, monkeypatch):
    if name in FEWER_BLOCKS:
        monkeypatch.setitem(*FEWER_BLOCKS[name])
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    # one set of variables for both (remat changes no variable either)
    variables = jax.jit(build_backbone(TINY[name]).init, static_argnames="train")(
        jax.random.key(0), images, train=False
    )
    plain = _loss_grads_stats(TINY[name], False, images, variables)
    remat = _loss_grads_stats(TINY[name], True, images, variables)
    assert not plain[0].use_checkpoint and remat[0].use_checkpoint
    for a, b in zip(plain[1:], remat[1:]):
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    # the forward pass and the new BatchNorm statistics: bit for bit the same at XLA's default
    # codegen level; at the suite's level 0 (conftest.py) ViT's differ in the last bit
    for x, y in zip(jax.tree_util.tree_leaves(plain[1:4]), jax.tree_util.tree_leaves(remat[1:4])):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6 * float(np.max(np.abs(x))))
    # gradients: the recomputed activations feed differently fused backward kernels, which sum
    # in another order (measured: at most 2.2e-5 of the largest gradient, ResNeSt; gradients
    # that are zero but for rounding, e.g. of a bias before a BatchNorm, differ in that noise)
    grads = [np.asarray(g) for g in jax.tree_util.tree_leaves(plain[4])]
    scale = max(float(np.max(np.abs(g))) for g in grads)
    for x, y in zip(grads, jax.tree_util.tree_leaves(remat[4])):
        np.testing.assert_allclose(x, np.asarray(y), rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_remat_override_reaches_the_backbone(backbone):
    dataset = "ade20k" if backbone == "vitl" else "cityscapes"
    config = load_config(REPO / f"configs/{dataset}.py:{backbone}")
    assert config.model.backbone.remat is False
    assert build_backbone(config.model.backbone).use_checkpoint is False
    config = load_config(REPO / f"configs/{dataset}.py:{backbone}", ["model.backbone.remat=True"])
    assert build_backbone(config.model.backbone).use_checkpoint is True


def test_demo_config_accepts_remat():
    config = load_config(REPO / "configs/demo.py", ["model.backbone.remat=True"])
    assert build_backbone(config.model.backbone).use_checkpoint is True


def _head_outputs_and_grads(head_remat: bool, chunk_elements: int, monkeypatch):
    monkeypatch.setenv("MCIBI_ATTENTION_CHUNK_ELEMENTS", str(chunk_elements))
    config = load_config(REPO / "configs/demo.py", [f"model.head.remat={head_remat}"])
    model = build_model(config.model)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    labels = jax.random.randint(jax.random.key(1), (2, 64, 64), 0, config.model.num_classes)
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), images, train=False)
    step = _train_value_and_grad(
        model,
        variables,
        images,
        lambda outputs: (outputs["stage1"], outputs["stage2"], outputs["aux"]),
        labels=labels,
        memory_momentum=0.9,
    )
    flops = xla_stats.jaxpr_flops(jax.make_jaxpr(step)(variables["params"]))
    return flops, jax.jit(step)(variables["params"])


def test_head_remat_changes_no_number_and_runs_no_conv_twice(monkeypatch):
    # chunked attention (16 similarities per chunk), as at the recipes' crops
    flops, plain = _head_outputs_and_grads(False, 16, monkeypatch)
    remat_flops, remat = _head_outputs_and_grads(True, 16, monkeypatch)
    plain_leaves, remat_leaves = jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(remat)
    for x, y in zip(plain_leaves, remat_leaves):  # logits, memories, statistics, gradients
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # only the memory read (pixels x classes x channels) is recomputed among the products
    assert flops <= remat_flops < flops * 1.001
    # unchunked attention keeps its probabilities only without remat: its similarities are
    # recomputed (a small attention, by the chunk limit)
    unchunked_flops, _ = _head_outputs_and_grads(False, 0, monkeypatch)
    unchunked_remat_flops, _ = _head_outputs_and_grads(True, 0, monkeypatch)
    assert unchunked_flops < unchunked_remat_flops < unchunked_flops * 1.01


@pytest.mark.parametrize("backbone", BACKBONES)
def test_head_remat_override_reaches_the_model(backbone):
    dataset = "ade20k" if backbone == "vitl" else "cityscapes"
    assert (
        build_model(load_config(REPO / f"configs/{dataset}.py:{backbone}").model).head.remat
        is False
    )
    config = load_config(REPO / f"configs/{dataset}.py:{backbone}", ["model.head.remat=True"])
    assert build_model(config.model).head.remat is True


def test_configs_saved_before_head_remat_still_load():
    config = load_config(REPO / "configs/demo.py")
    head = config.model.head.to_dict()
    del head["remat"]
    assert head_of(head).remat is False
