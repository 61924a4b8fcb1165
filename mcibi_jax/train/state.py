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
    opt_state: the optimizer's state (momentum buffers, update count);
    ema_params: None, or (``train.ema_decay`` > 0) the exponential moving average of the model's
    variables {"params", "batch_stats", "memory"}: the reference averages its whole state_dict,
    BatchNorm statistics and memory included (see :func:`ema_update`)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    memory: Any
    opt_state: optax.OptState
    ema_params: Any = None

    @property
    def variables(self) -> dict[str, Any]:
        """The model's variables, as :func:`mcibi_jax.porting.variables.save_variables` takes them."""
        return {"params": self.params, "batch_stats": self.batch_stats, "memory": self.memory}

    @property
    def export_variables(self) -> dict[str, Any]:
        """The variables to save and evaluate: the EMA ones when kept, else :attr:`variables`."""
        return dict(self.ema_params) if self.ema_params is not None else self.variables


def ema_update(ema: Any, current: Any, decay: float | jax.Array) -> Any:
    """``decay * ema + (1 - decay) * current`` leaf by leaf, after every optimizer step, with no
    warm-up: the reference's EMASegmentor with momentum ``1 - decay`` (its default 0.0005 is
    ``decay=0.9995``)."""
    return jax.tree_util.tree_map(
        lambda e, c: (e * decay + c.astype(e.dtype) * (1 - decay)).astype(e.dtype), ema, current
    )


def init_variables(model: MCIBI, rng: jax.Array, image_size: tuple[int, int]) -> dict[str, Any]:
    """Freshly initialised variables (params, batch_stats, memory) for images of ``image_size``."""
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    return jax.jit(lambda key: model.init(key, images, train=False))(rng)


def create_train_state(
    variables: dict[str, Any], tx: optax.GradientTransformation, ema: bool = False
) -> TrainState:
    """The state before the first step; with ``ema`` the average starts as a copy of the
    variables (the reference copies the model when it builds its EMA)."""
    params = variables["params"]
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        memory=variables["memory"],
        opt_state=tx.init(params),
    )
    if ema:
        state = state.replace(ema_params=jax.tree_util.tree_map(jnp.array, state.variables))
    return state
