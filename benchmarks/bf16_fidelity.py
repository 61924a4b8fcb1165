"""How far bfloat16 compute moves a model's outputs and gradients from float32.

    python benchmarks/bf16_fidelity.py --config=configs/demo.py --checkpoint=/tmp/mcibi_demo/checkpoints/final
    python benchmarks/bf16_fidelity.py --config=configs/cityscapes.py:r50 --checkpoint=r50_cityscapes.pth \\
        --set=dataset.root=/data/cityscapes --set=train.batch_size=8 --set=train.num_replicas=1

Runs the same float32 variables (an exported checkpoint, a released .pth, or a random
initialisation when ``--checkpoint`` is left out) through the float32 and the bfloat16 model on
the first training batch of the config's dataset (augmented as in training; dropout off), and
prints: the training loss of both; the eval-mode logits' relative error and argmax agreement;
the gradients' global cosine similarity and relative error, their median per-tensor cosine and
the tensors that agree least. Random weights make the gradients ill-conditioned (see
tests/test_bfloat16.py); trained weights are what this is for.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mcibi_jax
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.train.objective import loss_and_updates
from mcibi_jax.train.state import init_variables


def _variables(
    checkpoint: str | None, config: Any, model: Any, image_size: tuple[int, int]
) -> dict:
    from mcibi_jax.porting.variables import load_variables, variables_from_pth

    if not checkpoint:
        return init_variables(model, jax.random.key(0, impl="rbg"), image_size)
    if checkpoint.endswith((".pth", ".pt")):
        return variables_from_pth(checkpoint, config)
    return load_variables(checkpoint, config)


def _first_batch(config: Any) -> tuple[np.ndarray, np.ndarray]:
    from mcibi_jax.data.experiment_data import experiment_data
    from mcibi_jax.sharding import data_mesh

    batch = next(iter(experiment_data(config).training(data_mesh()).epoch(1)))
    return np.asarray(batch["images"], np.float32), np.asarray(batch["labels"], np.int32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms > 0 else float("nan")


def compare(config: Any, checkpoint: str | None = None, worst: int = 5) -> dict[str, Any]:
    """The float32 vs bfloat16 figures (see the module docstring) as a dict."""
    model_config = config.model.to_dict()
    model_config["head"]["dropout"] = 0.0
    for aux in model_config["auxiliary"]:
        aux["dropout"] = 0.0
    images, labels = _first_batch(config)
    models = {
        "float32": build_model(model_config),
        "bfloat16": build_model(model_config, dtype=jnp.bfloat16),
    }
    variables = _variables(checkpoint, config, models["float32"], images.shape[1:3])
    ignore_label = int(config.dataset.get("ignore_label", -100))
    num_replicas = int(config.train.get("num_replicas", 1))
    if images.shape[0] % num_replicas:
        num_replicas = 1
    out: dict[str, Any] = {}
    for name, model in models.items():

        def objective(params, model=model):
            return loss_and_updates(
                model,
                model_config,
                params,
                variables["batch_stats"],
                variables["memory"],
                jnp.asarray(images),
                jnp.asarray(labels),
                learning_rate=1e-3,
                epoch=2,
                ignore_label=ignore_label,
                num_replicas=num_replicas,
            )

        (loss, _), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(variables["params"])
        logits = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False)["stage2"])(
            variables, jnp.asarray(images)
        )
        out[name] = {"loss": float(loss), "grads": grads, "logits": np.asarray(logits, np.float32)}

    reference, low = out["float32"], out["bfloat16"]
    flat = jax.tree_util.tree_flatten_with_path(reference["grads"])[0]
    flat_low = jax.tree_util.tree_leaves(low["grads"])
    per_tensor = sorted(
        (_cosine(np.ravel(a), np.ravel(b)), jax.tree_util.keystr(path), int(np.size(a)))
        for (path, a), b in zip(flat, flat_low)
        if np.any(a)
    )
    a = np.concatenate([np.ravel(x) for _, x in flat])
    b = np.concatenate([np.ravel(x) for x in flat_low])
    logits, logits_low = reference["logits"], low["logits"]
    return {
        "loss_float32": reference["loss"],
        "loss_bfloat16": low["loss"],
        "logits_rel_err": float(np.abs(logits - logits_low).max() / np.abs(logits).max()),
        "argmax_agreement": float((logits.argmax(-1) == logits_low.argmax(-1)).mean()),
        "grad_cosine": _cosine(a, b),
        "grad_rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
        "grad_median_tensor_cosine": float(np.median([c for c, _, _ in per_tensor])),
        "worst_tensors": per_tensor[:worst],
        "batch": tuple(images.shape),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="config spec, e.g. configs/demo.py or configs/ade20k.py:r50"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="exported checkpoint directory or released .pth (default: random weights)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable)",
    )
    parser.add_argument(
        "--worst", type=int, default=5, help="how many of the least agreeing tensors to list"
    )
    args = parser.parse_args(argv)
    try:
        config = mcibi_jax.load_config(args.config, args.set)
    except mcibi_jax.ConfigError as error:
        parser.error(str(error))
    r = compare(config, args.checkpoint, args.worst)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {args.config}, "
        f"weights {args.checkpoint or 'random'}, batch {'x'.join(map(str, r['batch']))}",
        flush=True,
    )
    print(f"loss        float32 {r['loss_float32']:.6f}  bfloat16 {r['loss_bfloat16']:.6f}")
    print(
        f"logits      max rel err {r['logits_rel_err']:.3e}  argmax agreement {100 * r['argmax_agreement']:.2f} %"
    )
    print(
        f"gradients   cosine {r['grad_cosine']:.4f}  rel err {r['grad_rel_err']:.3e}  "
        f"median per-tensor cosine {r['grad_median_tensor_cosine']:.4f}"
    )
    for cosine, path, size in r["worst_tensors"]:
        print(f"  cosine {cosine:7.4f}  {path} ({size} values)")


if __name__ == "__main__":
    main()
