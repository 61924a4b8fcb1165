"""Fill (or read back) a model's Flax variables from (to) a PyTorch state_dict, strictly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from mcibi_jax.porting.mapping import flax_path, to_flax_array, to_torch_array, torch_shape_to_flax


class PortError(ValueError):
    """The state_dict does not fit the model; the message lists every offending key."""


def _describe(items: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {shown}{more}"


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray], abstract_variables: Mapping[str, Any]
) -> dict:
    """Flax variables with the structure of ``abstract_variables`` filled from ``state_dict``.

    Every key of the state_dict must be consumed and every leaf filled, with matching
    shapes; otherwise :class:`PortError` lists the unused keys, the unfilled leaves and the
    shape mismatches (a checkpoint of another config shows up as exactly that).
    """
    targets = traverse_util.flatten_dict(dict(abstract_variables))
    filled: dict[tuple, np.ndarray] = {}
    unused, mismatched, mismatched_paths = [], [], set()
    for key, value in state_dict.items():
        value = np.asarray(value)
        path = flax_path(key, value.ndim)
        if path is None:
            continue
        if path not in targets:
            unused.append(f"{key} {tuple(value.shape)}")
            continue
        expected = tuple(targets[path].shape)
        if torch_shape_to_flax(path, value.shape) != expected:
            mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)}, model expects {expected} as {'/'.join(path)}"
            )
            mismatched_paths.add(path)
            continue
        filled[path] = to_flax_array(path, value).astype(targets[path].dtype, copy=False)
    missing = [
        "/".join(p) + f" {tuple(targets[p].shape)}"
        for p in targets
        if p not in filled and p not in mismatched_paths
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches:" + _describe(mismatched))
    if unused:
        problems.append(
            f"{len(unused)} checkpoint keys the model has no place for:" + _describe(unused)
        )
    if missing:
        problems.append(
            f"{len(missing)} model variables the checkpoint does not provide:" + _describe(missing)
        )
    if problems:
        raise PortError("the checkpoint does not match the model config.\n" + "\n".join(problems))
    return traverse_util.unflatten_dict(filled)


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """PyTorch state_dict (NCHW layouts) of Flax variables; inverse of the mapping."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        collection, *modules, leaf = path
        value = np.asarray(value)
        if collection == "params":
            if leaf == "kernel":
                # a Dense/Conv nested under a `<name>_weight` parent is indistinguishable here;
                # the released layouts only use it for attention in_proj.
                name = "weight"
                if modules and modules[-1] == "in_proj":
                    modules, name = modules[:-1], "in_proj_weight"
                torch_key = ".".join([*modules, name])
            elif leaf == "bias" and modules and modules[-1] == "in_proj":
                torch_key = ".".join([*modules[:-1], "in_proj_bias"])
            elif leaf == "scale":
                torch_key = ".".join([*modules, "weight"])
            else:
                torch_key = ".".join([*modules, leaf])
        elif collection == "batch_stats":
            torch_key = ".".join([*modules, {"mean": "running_mean", "var": "running_var"}[leaf]])
        elif collection == "memory":
            torch_key = ".".join([*modules, "memory"])
        else:
            continue
        out[torch_key] = to_torch_array(path, value)
    return out


__all__ = ["PortError", "state_dict_to_variables", "variables_to_state_dict"]
