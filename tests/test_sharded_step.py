"""The jitted step over 8 (simulated CPU) devices equals the step on one device, and the
memory follows the per-replica-update-then-mean rule; so does it with the head's attention in
query chunks (as at large crops), and with the backbone's and the head's remat and the losses in
bands of label rows on top."""

from __future__ import annotations

from tests.helpers import result_of, run_python

SCRIPT = r"""
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from mcibi_jax import load_config
from mcibi_jax.data import synthetic
from mcibi_jax.models.memory import memory_momentum
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.train.optimizer import optimizer_from_config
from mcibi_jax.train.state import create_train_state, init_variables
from mcibi_jax.sharding import data_mesh, global_batch, replicate
from mcibi_jax.train.step import make_train_step

config = load_config("configs/demo.py", ["dataset.image_size=(32, 32)", "train.num_replicas=8"])
model_config = config.model.to_dict()
model = build_model(config.model)
variables = init_variables(model, jax.random.key(0, impl="rbg"), (32, 32))
memory = np.array(jax.random.normal(jax.random.key(3), variables["memory"]["memory_module"]["memory"].shape))
memory[::2] = 0.0  # some rows initialised from class means, the others moved
variables = {**variables, "memory": {"memory_module": {"memory": jnp.asarray(memory)}}}
images, labels = synthetic.make_split(1, 8, (32, 32), 4)
out = {}
remat_config = load_config("configs/demo.py", ["dataset.image_size=(32, 32)", "train.num_replicas=8",
                                               "model.backbone.remat=True", "model.head.remat=True"])
cases = (("one", jax.devices()[:1]), ("eight", jax.devices()), ("chunked", jax.devices()),
         ("remat", jax.devices()))
for name, devices in cases:
    if name == "chunked":  # read when the step is traced: every query row its own chunk
        os.environ["MCIBI_ATTENTION_CHUNK_ELEMENTS"] = "7"
    if name == "remat":  # both remats, and the losses in bands of one label row
        os.environ["MCIBI_LOSS_BAND_ELEMENTS"] = "50"
        model = build_model(remat_config.model)
    mesh = data_mesh(devices)
    tx, schedule = optimizer_from_config(variables["params"], config.train, 10)
    step = make_train_step(model, model_config, tx, schedule, 10, mesh, -100, 8)
    state = replicate(create_train_state(variables, tx), mesh)
    state, metrics = step(state, global_batch({"images": images, "labels": labels}, mesh), replicate(jax.random.key(1), mesh))
    out[name] = {"loss": float(metrics["loss"]),
                 "params": [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(state.params)[:6]],
                 "memory": np.asarray(state.memory["memory_module"]["memory"]).tolist(),
                 "devices": len(devices)}
print("RESULT " + json.dumps(out))
"""


def test_eight_devices_equal_one():
    out = result_of(run_python(SCRIPT, devices=8))
    one = out["one"]
    assert [out[k]["devices"] for k in ("one", "eight", "chunked", "remat")] == [1, 8, 8, 8]
    import numpy as np

    for eight in (out["eight"], out["chunked"], out["remat"]):
        assert abs(one["loss"] - eight["loss"]) <= 1e-5 * abs(one["loss"])
        for a, b in zip(one["params"], eight["params"]):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(eight["memory"]), np.asarray(one["memory"]), rtol=1e-4, atol=1e-6
        )
