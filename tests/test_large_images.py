"""A Cityscapes-sized image (2048 x 4096) through sliding-window inference on CPU.

``tta_scores`` streams the windows through a ``lax.scan``, so the peak memory is one window's
activations plus the image and the score canvas, not all windows at once. Runs in a fresh
subprocess so that its peak RSS (``VmHWM``) is its own. Measured (2-core CPU, the
resnet50_cityscapes fixture model, 25 windows of 512 x 1024, 10-20 s): peak RSS ~1.4 GB. XLA
reports ~290 MB of scratch for one window's forward pass and ~300 MB for the whole slide
(plus the 98 MB image and the 160 MB score canvas); materialising all 25 windows would need
~7 GB of scratch. The limit below sits between the two.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_python
from tests.reference_data import FIXTURES

CASE = "resnet50_cityscapes"
HEIGHT, WIDTH = 2048, 4096
CROP, STRIDE = (512, 1024), (384, 768)  # 5 x 5 overlapping windows
PEAK_RSS_LIMIT_MB = 3072

_SCRIPT = """
import json, sys, time
import numpy as np
import mcibi_jax
import jax
import jax.numpy as jnp
from mcibi_jax.evaluation.tta import slide_scores, tta_scores, window_starts
from mcibi_jax.reference_config import model_config_from_reference
from tests.reference_data import FIXTURES, read_case

case, height, width, crop, stride = json.loads(sys.argv[1])
meta, _ = read_case(case)
model_config = model_config_from_reference(meta["reference_config"])
segmenter = mcibi_jax.Segmenter.from_pth(FIXTURES / f"{case}.pth", model_config)
images = np.random.default_rng(0).standard_normal((1, height, width, 3), dtype=np.float32)
inference = {"mode": "slide", "cropsize": crop, "stride": stride, "use_probs_before_resize": True}
started = time.perf_counter()
scores = np.asarray(tta_scores(segmenter.model, segmenter.variables, images, inference,
                               align_corners=model_config.get("align_corners", False)))
seconds = time.perf_counter() - started
sums = scores.sum(-1)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (forked) parent, here the pytest
# process, which may already hold more than the limit.
peak_rss_mb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
# XLA's own account of the scratch memory: all windows vs one window of the model.
window = jax.ShapeDtypeStruct((1, crop[0], crop[1], 3), jnp.float32)
one = jax.jit(lambda v, x: segmenter.model.apply(v, x, train=False)["stage2"]).lower(
    segmenter.variables, window).compile().memory_analysis()
slide = slide_scores.lower(segmenter.model, segmenter.variables, jax.ShapeDtypeStruct(images.shape, jnp.float32),
                           tuple(crop), tuple(stride), True, False).compile().memory_analysis()
print(json.dumps({
    "shape": list(scores.shape), "dtype": str(scores.dtype), "finite": bool(np.isfinite(scores).all()),
    "sum_min": float(sums.min()), "sum_max": float(sums.max()),
    "windows": len(window_starts(height, crop[0], stride[0])) * len(window_starts(width, crop[1], stride[1])),
    "seconds": seconds, "peak_rss_mb": peak_rss_mb,
    "window_temp_mb": None if one is None else one.temp_size_in_bytes / 2**20,
    "slide_temp_mb": None if slide is None else slide.temp_size_in_bytes / 2**20,
}))
"""


@pytest.mark.skipif(not (FIXTURES / f"{CASE}.pth").exists(), reason=f"fixture {CASE} missing")
def test_cityscapes_sized_image_slides_in_bounded_memory():
    argument = json.dumps([CASE, HEIGHT, WIDTH, list(CROP), list(STRIDE)])
    done = run_python(_SCRIPT, argument, devices=None)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    num_classes = json.loads((FIXTURES / f"{CASE}.json").read_text())["reference_config"][
        "num_classes"
    ]
    assert result["shape"] == [1, HEIGHT, WIDTH, num_classes]
    assert result["dtype"] == "float32" and result["finite"]
    assert result["windows"] == 25
    # Softmax probabilities averaged over the covering windows: each pixel still sums to 1,
    # so every window landed where it belongs and the overlaps were divided out.
    assert abs(result["sum_min"] - 1) < 1e-5 and abs(result["sum_max"] - 1) < 1e-5, result
    assert result["peak_rss_mb"] < PEAK_RSS_LIMIT_MB, result
    if result["window_temp_mb"] is not None and result["slide_temp_mb"] is not None:
        # Streamed: the whole slide needs about one window's scratch, not 25 windows' worth.
        assert result["slide_temp_mb"] < 2 * result["window_temp_mb"], result
