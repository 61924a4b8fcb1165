"""The data-parallel train step moves no activations between devices: on 8 (simulated CPU)
devices its only collectives are all-reduces of parameter size (gradients, BatchNorm and memory
statistics), whatever ``num_replicas`` is. So the memory update already runs
per shard with a mean across shards; nothing gathers the feature maps."""

from __future__ import annotations

import pytest

from tests.helpers import result_of, run_python

SCRIPT = r"""
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from mcibi_jax import load_config
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.train.optimizer import optimizer_from_config
from mcibi_jax.train.state import create_train_state, init_variables
from mcibi_jax.sharding import data_mesh
from mcibi_jax.train.step import make_train_step

replicas = int(sys.argv[1])
config = load_config("configs/demo.py", [f"train.num_replicas={replicas}", "train.batch_size=16"])
model = build_model(config.model)
size = (64, 64)
variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0, impl="rbg"), size))
tx, schedule = optimizer_from_config(variables["params"], config.train.to_dict(), 100)
state = jax.eval_shape(lambda v: create_train_state(v, tx), variables)
step = make_train_step(model, config.model.to_dict(), tx, schedule, 100, data_mesh(), -100, replicas)
batch = {"images": jax.ShapeDtypeStruct((16, *size, 3), jnp.float32),
         "labels": jax.ShapeDtypeStruct((16, *size), jnp.int32)}
text = step.lower(state, batch, jax.eval_shape(lambda: jax.random.key(1))).compile().as_text()
collectives = {}
for line in text.splitlines():
    found = re.search(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(", line)
    if found:
        sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"\[([0-9,]*)\]", found.group(1))]
        op = collectives.setdefault(found.group(2), {"count": 0, "largest": 0})
        op["count"] += 1
        op["largest"] = max([op["largest"], *sizes])
largest_param = max(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
print("RESULT " + json.dumps({"devices": jax.device_count(), "collectives": collectives, "largest_param": largest_param}))
"""


@pytest.mark.parametrize("num_replicas", [1, 8])
def test_the_sharded_step_only_all_reduces_statistics(num_replicas):
    result = result_of(run_python(SCRIPT, str(num_replicas), devices=8))
    assert result["devices"] == 8
    collectives = result["collectives"]
    assert set(collectives) == {"all-reduce"}, collectives
    # On CPU a Winograd conv's kernel gradient is summed over the batch, so across devices, in
    # its transformed form: 16 / 9 of the kernel (models/winograd.py).
    assert 0 < collectives["all-reduce"]["largest"] <= result["largest_param"] * 16 / 9, (
        collectives,
        result["largest_param"],
    )
