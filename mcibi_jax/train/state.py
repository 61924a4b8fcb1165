"""The training state: everything that changes from one step to the next."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mcibi_jax.models.segmentor import MCIBI


@struct.dataclass
class TrainState:
    """step: updates done so far; params; batch_stats (BatchNorm running statistics);
    memory: the ``memory`` collection (updated by the step, never by gradients);
    opt_state: the optimizer's state (momentum buffers, update count)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    memory: Any
    opt_state: optax.OptState

    @property
    def variables(self) -> dict[str, Any]:
        """The model's variables, as :func:`mcibi_jax.porting.port.save_variables` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats, "memory": self.memory}


def init_variables(model: MCIBI, rng: jax.Array, image_size: tuple[int, int]) -> dict[str, Any]:
    """Freshly initialised variables (params, batch_stats, memory) for images of ``image_size``."""
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    return jax.jit(lambda key: model.init(key, images, train=False))(rng)


def create_train_state(variables: dict[str, Any], tx: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        memory=variables["memory"],
        opt_state=tx.init(params),
    )
