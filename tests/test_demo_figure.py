"""docs/make_demo_figure.py: the README's picture of the demo's predictions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from mcibi_jax import load_config
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.porting.variables import save_variables
from mcibi_jax.train.state import init_variables

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_demo_figure", REPO / "docs" / "make_demo_figure.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figure_rows_show_image_truth_and_prediction(tmp_path):
    script = _script()
    config = load_config(REPO / "configs" / "demo.py")
    model = build_model(config.model)
    save_variables(
        tmp_path / "run" / "checkpoints" / "final",
        init_variables(model, jax.random.key(0, impl="rbg"), (32, 32)),
    )
    out = tmp_path / "figure.png"
    assert script.main([f"--workdir={tmp_path / 'run'}", f"--out={out}", "--num=2"]) == 0
    picture = np.asarray(Image.open(out))
    assert picture.shape == (script.HEADER + 2 * (script.CELL + 6) + 26, 3 * script.CELL + 24, 3)
    images, truths = script.demo_images(config, 2)
    top, scale = script.HEADER, script.CELL // images.shape[1]
    np.testing.assert_array_equal(
        picture[top : top + script.CELL : scale, 6 : 6 + script.CELL : scale], images[0]
    )
    truth = picture[
        top : top + script.CELL : scale, 6 + script.CELL + 6 : 6 + 2 * script.CELL + 6 : scale
    ]
    assert (truth[truths[0] < 0] == script.IGNORED).all()
    committed = REPO / "docs" / "demo_predictions.png"
    # the README's picture stays small
    assert committed.is_file() and committed.stat().st_size < 200_000
