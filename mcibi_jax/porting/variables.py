"""Released PyTorch checkpoints -> Flax variables of our model, and orbax checkpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from mcibi_jax.models.segmentor import MCIBI, build_model
from mcibi_jax.porting.convert import PortError, state_dict_to_variables
from mcibi_jax.porting.pth import load_state_dict

VARIABLE_COLLECTIONS = ("params", "batch_stats", "memory")


def model_config_of(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accepts a full experiment config (with ``model``) or a model config."""
    return config["model"] if "model" in config else config


def abstract_variables(model: MCIBI, model_config: Mapping[str, Any]) -> dict:
    """Shapes and dtypes of the model's variables, without computing anything."""
    size = _probe_size(model_config)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def _probe_size(model_config: Mapping[str, Any]) -> int:
    img_size = model_config["backbone"].get("img_size")
    if img_size:
        return int(img_size[0] if isinstance(img_size, (list, tuple)) else img_size)
    return 64


def variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]
) -> dict:
    """Flax variables (params, batch_stats, memory) of ``config``'s model from a state_dict."""
    model_config = model_config_of(config)
    model = build_model(model_config)
    return state_dict_to_variables(state_dict, abstract_variables(model, model_config))


def variables_from_pth(
    path: str | os.PathLike, config: Mapping[str, Any], entry: str | None = None
) -> dict:
    """Reads a released ``.pth`` (without torch) and maps it onto ``config``'s model."""
    state_dict = load_state_dict(path, entry=entry)
    try:
        return variables_from_state_dict(state_dict, config)
    except PortError as error:
        raise PortError(f"{path}: {error}") from None


def save_variables(directory: str | os.PathLike, variables: Mapping[str, Any]) -> Path:
    """Writes the variables as an orbax checkpoint (a fresh directory)."""

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new output directory")
    tree = {
        k: jax.tree_util.tree_map(np.asarray, dict(variables[k]))
        for k in VARIABLE_COLLECTIONS
        if k in variables
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, tree)
    return directory


def load_variables(directory: str | os.PathLike, config: Mapping[str, Any]) -> dict:
    """Restores variables written by :func:`save_variables`, checked against ``config``'s model."""

    directory = Path(directory).absolute()
    if not directory.exists():
        raise FileNotFoundError(f"no checkpoint at {directory}")
    model_config = model_config_of(config)
    target = abstract_variables(build_model(model_config), model_config)
    target = {k: target[k] for k in VARIABLE_COLLECTIONS if k in target}
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            restored = checkpointer.restore(directory, target)
        except (ValueError, KeyError) as error:
            raise PortError(
                f"the checkpoint at {directory} does not match the model config: {error}"
            ) from None
    # orbax restores the stored shapes whatever the target says: compare them ourselves.
    wanted = traverse_util.flatten_dict(target)
    got = traverse_util.flatten_dict(dict(restored))
    mismatches = [
        f"{'/'.join(path)}: checkpoint {tuple(np.shape(got[path])) if path in got else 'missing'}, model expects {tuple(leaf.shape)}"
        for path, leaf in wanted.items()
        if path not in got or tuple(np.shape(got[path])) != tuple(leaf.shape)
    ]
    mismatches += [
        f"{'/'.join(path)}: in the checkpoint, not in the model"
        for path in got
        if path not in wanted
    ]
    if mismatches:
        shown = "\n  ".join(mismatches[:20]) + (
            f"\n  ... and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        )
        raise PortError(
            f"the checkpoint at {directory} does not match the model config ({len(mismatches)} variables):\n  {shown}"
        )
    return jax.tree_util.tree_map(jnp.asarray, restored)
