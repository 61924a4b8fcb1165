"""The rule that turns a released PyTorch ``state_dict`` key into a Flax variable path.

Our modules are named after the PyTorch modules they reproduce, so a key
``a.b.c.<leaf>`` lives at ``<collection>/a/b/c/<flax leaf>``:

=========================  ==============================  =====================
PyTorch leaf               Flax collection / leaf          array transform
=========================  ==============================  =====================
``weight`` (4-D, conv)     ``params`` / ``kernel``         (O, I, kh, kw) -> (kh, kw, I, O)
``weight`` (2-D, linear)   ``params`` / ``kernel``         (O, I) -> (I, O)
``weight`` (1-D, norm)     ``params`` / ``scale``          --
``bias``                   ``params`` / ``bias``           --
``running_mean``           ``batch_stats`` / ``mean``      --
``running_var``            ``batch_stats`` / ``var``       --
``<name>_weight``          ``params`` / ``<name>/kernel``  as ``weight``
``<name>_bias``            ``params`` / ``<name>/bias``    --
``memory``                 ``memory`` / ``memory``         --
anything else              ``params`` / same name          --
``num_batches_tracked``    dropped (carries no information)
=========================  ==============================  =====================
"""

from __future__ import annotations

import numpy as np

SKIPPED_LEAVES = ("num_batches_tracked",)

FlaxPath = tuple[str, ...]  # (collection, module, ..., leaf)


def flax_path(key: str, ndim: int) -> FlaxPath | None:
    """Flax path ``(collection, *modules, leaf)`` of a state_dict key, None if dropped."""
    *modules, leaf = key.split(".")
    if leaf in SKIPPED_LEAVES:
        return None
    if leaf == "weight":
        return ("params", *modules, "kernel" if ndim >= 2 else "scale")
    if leaf == "bias":
        return ("params", *modules, "bias")
    if leaf == "running_mean":
        return ("batch_stats", *modules, "mean")
    if leaf == "running_var":
        return ("batch_stats", *modules, "var")
    if leaf == "memory":
        return ("memory", *modules, "memory")
    for suffix, flax_leaf in (("_weight", "kernel"), ("_bias", "bias")):
        if leaf.endswith(suffix):
            return ("params", *modules, leaf[: -len(suffix)], flax_leaf)
    return ("params", *modules, leaf)


def to_flax_array(path: FlaxPath, value: np.ndarray) -> np.ndarray:
    """Converts a PyTorch tensor to the layout of the Flax leaf at ``path``."""
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return np.transpose(value, (1, 0))
    return value


def to_torch_array(path: FlaxPath, value: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_flax_array`."""
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (3, 2, 0, 1))
        if value.ndim == 2:
            return np.transpose(value, (1, 0))
    return value


def torch_shape_to_flax(path: FlaxPath, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape a PyTorch tensor of ``shape`` takes once converted to the leaf at ``path``."""
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)
