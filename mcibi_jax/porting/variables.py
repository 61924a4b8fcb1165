"""Released PyTorch checkpoints -> Flax variables of our model, and orbax checkpoints."""

from __future__ import annotations

import os
import tempfile
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
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; choose a new output directory")
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new output directory")
    # orbax reports an unwritable folder from its threads and then waits on them for minutes
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory.parent):
            pass
    except OSError as error:
        raise PortError(
            f"cannot write the checkpoint {directory}: {error.strerror or error} "
            f"({error.filename or directory.parent}); choose a folder this process can write"
        ) from None
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
    if not directory.is_dir():
        raise PortError(
            f"{directory} is a file; a checkpoint of variables is a folder (written by "
            "mcibi_jax.port or by training: DIR/checkpoints/final)"
        )
    model_config = model_config_of(config)
    target = abstract_variables(build_model(model_config), model_config)
    target = {k: target[k] for k in VARIABLE_COLLECTIONS if k in target}
    with ocp.StandardCheckpointer() as checkpointer:
        # Compared before restoring: orbax's own mismatch error prints both whole trees, and it
        # restores the stored shapes whatever the target says.
        stored = getattr(checkpointer.metadata(directory).item_metadata, "tree", None)
        if stored is None:
            raise PortError(
                f"{directory} holds no checkpoint of variables (written by mcibi_jax.port or by "
                "training: DIR/checkpoints/final)"
            )
        _check_shapes(directory, target, stored)
        try:
            restored = checkpointer.restore(directory, target)
        except (ValueError, KeyError) as error:
            raise PortError(
                f"the checkpoint at {directory} does not match the model config: {error}"
            ) from None
    return jax.tree_util.tree_map(jnp.asarray, restored)


def _check_shapes(directory: Path, target: Mapping[str, Any], found: Mapping[str, Any]) -> None:
    """PortError listing the variables whose names or shapes differ between the model's
    ``target`` and the checkpoint's tree ``found`` (orbax's array metadata)."""
    wanted = traverse_util.flatten_dict(dict(target))
    got = {
        path: tuple(getattr(leaf, "shape", None) or np.shape(leaf))
        for path, leaf in traverse_util.flatten_dict(dict(found)).items()
    }
    mismatches = [
        f"{'/'.join(path)}: checkpoint {got.get(path, 'missing')}, model expects {tuple(leaf.shape)}"
        for path, leaf in wanted.items()
        if got.get(path) != tuple(leaf.shape)
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
