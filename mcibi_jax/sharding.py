"""How arrays are laid out over the devices of every process: one 1-D ``('data',)`` mesh.

Training is data parallel: the batch is split along ``'data'`` (:func:`batch_sharding`,
:func:`global_batch`), everything else (parameters, optimizer state, memory, keys) is the same
on every device (:func:`replicated_sharding`, :func:`replicate`). Each host loads only its part
of a global batch; :func:`global_batch` assembles the parts into one ``jax.Array``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"  # the mesh axis the batch is split along


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh ``('data',)`` over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` copied to every device of ``mesh`` (:func:`replicated_sharding`), from one or many
    processes.

    With one process this is ``jax.device_put``, always a copy: the training step donates
    (overwrites) the state it is given, and the caller's arrays must survive that. With several, where ``device_put`` refuses
    devices of other processes, every process must call it with the same values (the same seed
    gives the same initialisation); each puts its own copy on its local devices. Typed PRNG keys
    are handled.
    """
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        # jax 0.10's device_put onto several devices reuses an array already on the first one,
        # whatever may_alias says: copy it first, or donating the result deletes the caller's
        tree = jax.tree_util.tree_map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)
        return jax.device_put(tree, sharding, may_alias=False)

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def global_batch(
    host_batch: Mapping[str, Any], mesh: Mesh, axis: str | tuple[str, ...] = DATA
) -> dict[str, jax.Array]:
    """This host's part of a batch -> global ``jax.Array`` s split along the batch (leading) axis.

    Every host calls this with its own ``(B_host, ...)`` arrays; the result has
    ``B_host * jax.process_count()`` rows split over the mesh's ``axis`` (a name or a tuple of
    names), i.e. ``NamedSharding(mesh, PartitionSpec(axis))``. With one process the host batch
    is the global batch.
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    parts = math.prod(mesh.shape[name] for name in names)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        if rows % parts:
            raise ValueError(
                f"a global batch of {rows} rows ({x.shape[0]} per host) cannot be "
                f"split over the {parts} devices of mesh axis {axis!r}; use a batch "
                f"size that is a multiple of {parts}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return {key: put(value) for key, value in host_batch.items()}


__all__ = [
    "DATA",
    "batch_sharding",
    "data_mesh",
    "global_batch",
    "replicate",
    "replicated_sharding",
]
