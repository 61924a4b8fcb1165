"""Helpers shared by test modules (test modules never import each other)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections
import numpy as np
import scipy.io
from PIL import Image

import mcibi_jax
from mcibi_jax.recipes import released_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.py"
# The demo on 64 images of 32x32 in batches of 8: 8 steps per epoch, 3 epochs (the memory loss
# joins in epoch 2).
DEMO_FAST = [
    "dataset.image_size=(32, 32)",
    "dataset.train.num_images=64",
    "dataset.test.num_images=16",
    "train.num_epochs=3",
    "train.log_every=4",
]


def jaxpr_equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a (closed) jaxpr, its sub-jaxprs' (loops, conditionals, custom
    derivatives, nested jits) included."""
    from jax.extend import core

    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for sub in core.jaxprs_in_params(eqn.params):
            yield from jaxpr_equations(sub)


def load_script(folder: str, name: str) -> ModuleType:
    """``REPO/folder/name.py`` as a module, its folder on ``sys.path`` as when it runs as a script
    (the benchmark and launcher scripts are not part of the package)."""
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))
    spec = importlib.util.spec_from_file_location(f"_{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# Writers of tiny datasets in each official layout


def random_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def ids_image(ids: np.ndarray, h: int, w: int, fill: int) -> np.ndarray:
    """(h, w) label map starting with ``ids`` in raster order, padded with ``fill``."""
    flat = np.full(h * w, fill, dtype=np.int64)
    flat[: len(ids)] = ids
    return flat.reshape(h, w)


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def save_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def write_cityscapes(root: Path, *, lists: bool = False, seed: int = 0) -> dict[str, list[str]]:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_gtFine_labelIds.png.

    The first train image holds every label id 0..33. With ``lists``, also writes the
    ``<set>.txt`` files and the trainval folders that the reference reads.
    """
    rng = np.random.default_rng(seed)
    plan = {
        "train": [("aachen", (5, 7)), ("aachen", (6, 9)), ("bochum", (4, 11))],
        "val": [("frankfurt", (7, 5))],
        "test": [("berlin", (3, 13))],
    }
    ids: dict[str, list[str]] = {}
    for split, items in plan.items():
        ids[split] = []
        for n, (city, (h, w)) in enumerate(items):
            stem = f"{city}_{n:06d}_000019"
            labels = (
                ids_image(np.arange(34), h, w, 7)
                if (split, n) == ("train", 0)
                else rng.integers(0, 34, size=(h, w))
            )
            save_png(
                root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                random_rgb(rng, h, w),
            )
            save_png(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                labels.astype(np.uint8),
            )
            ids[split].append(f"{city}/{stem}_leftImg8bit")
    ids["trainval"] = ids["train"] + ids["val"]
    if lists:
        for split in ("train", "val"):
            for kind in ("leftImg8bit", "gtFine"):
                for src in sorted((root / kind / split).rglob("*.png")):
                    dst = root / kind / "trainval" / src.relative_to(root / kind / split)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(src.read_bytes())
        for split, names in ids.items():
            (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in names))
    return ids


def write_ade20k(root: Path, *, lists: bool = False, seed: int = 1) -> dict[str, list[str]]:
    """ADEChallengeData2016/images/{training,validation}/*.jpg + annotations/.../*.png."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    plan = {"train": ("training", [(11, 14), (5, 8)]), "val": ("validation", [(9, 6)])}
    ids: dict[str, list[str]] = {}
    for split, (folder, sizes) in plan.items():
        ids[split] = []
        for n, (h, w) in enumerate(sizes):
            name = f"ADE_{split}_{n + 1:08d}"
            labels = (
                ids_image(np.arange(151), h, w, 0)
                if (split, n) == ("train", 0)
                else rng.integers(0, 151, size=(h, w))
            )
            save_jpg(base / "images" / folder / f"{name}.jpg", random_rgb(rng, h, w))
            save_png(base / "annotations" / folder / f"{name}.png", labels.astype(np.uint8))
            ids[split].append(name)
    if lists:
        for split, names in ids.items():
            (base / f"{split}.txt").write_text("".join(f"{i}\n" for i in reversed(names)))
            ids[split] = list(reversed(names))
    return ids


def write_cocostuff(root: Path, seed: int = 2) -> dict[str, list[str]]:
    """images/*.jpg, annotations/*.mat (S, names, captions, ...) and imageLists/*.txt (v1.1)."""
    rng = np.random.default_rng(seed)
    plan = {"train": [(14, 14), (5, 9)], "test": [(7, 6)]}
    ids: dict[str, list[str]] = {}
    serial = 77
    for split, sizes in plan.items():
        ids[split] = []
        for n, (h, w) in enumerate(sizes):
            name = f"COCO_train2014_{serial:012d}"
            serial += 1
            every = np.concatenate([np.arange(183), [255]])
            labels = (
                ids_image(every, h, w, 0)
                if (split, n) == ("train", 0)
                else rng.integers(0, 183, size=(h, w))
            )
            save_jpg(root / "images" / f"{name}.jpg", random_rgb(rng, h, w))
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(
                root / "annotations" / f"{name}.mat",
                {
                    "S": labels.astype(np.uint16),
                    "names": np.array(["unlabeled", "person"], dtype=object),
                    "captions": np.array(["a caption"], dtype=object),
                    "regionMapStuff": np.ones((h, w), dtype=np.uint16),
                    "regionLabelsStuff": np.zeros((1, 1), dtype=np.uint8),
                },
            )
            ids[split].append(name)
    ids["all"] = ids["train"] + ids["test"]
    (root / "imageLists").mkdir(parents=True, exist_ok=True)
    for split, names in ids.items():
        (root / "imageLists" / f"{split}.txt").write_text("".join(f"{i}\n" for i in names))
    return ids


def write_lip(root: Path, seed: int = 3) -> dict[str, list[str]]:
    """{train,val}_images/*.jpg, {train,val}_segmentations/*.png, {train,val}_id.txt, test."""
    rng = np.random.default_rng(seed)
    plan = {
        "train": ("train", [(5, 4), (9, 7)]),
        "val": ("val", [(6, 5)]),
        "test": ("testing", [(4, 9)]),
    }
    ids: dict[str, list[str]] = {}
    for split, (prefix, sizes) in plan.items():
        ids[split] = []
        for n, (h, w) in enumerate(sizes):
            name = f"{100034 + 7 * n + len(split)}_{483681 + n}"
            labels = (
                ids_image(np.arange(20), h, w, 0)
                if (split, n) == ("train", 0)
                else rng.integers(0, 20, size=(h, w))
            )
            save_jpg(root / f"{prefix}_images" / f"{name}.jpg", random_rgb(rng, h, w))
            if split != "test":
                save_png(root / f"{prefix}_segmentations" / f"{name}.png", labels.astype(np.uint8))
            ids[split].append(name)
        (root / f"{split}_id.txt").write_text("".join(f"{i}\n" for i in ids[split]))
    return ids


# ------------------------------------------------------------------------------------------
# Subprocesses: single- and multi-process runs of the package on the CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without cluster variables, one CPU device, the repo importable; plus
    ``extra`` (whose ``XLA_FLAGS`` join the test session's, see conftest.py)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MCIBI_", "SLURM_", "OMPI_", "TPU_"))
    }
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    # the test session's XLA flags (conftest.py), with this run's device count
    inherited = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    own = extra.get("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    env["XLA_FLAGS"] = " ".join([*inherited, own])
    return env


def run_python(
    script: str,
    *args: str,
    devices: int | None = 1,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python -c script args...`` in the repo with :func:`subprocess_env` (``devices`` CPU
    devices; None: the environment as it is, or ``env``), its output captured as text."""
    if env is None and devices is not None:
        env = subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def result_of(proc: subprocess.CompletedProcess, tail: int = 3000) -> Any:
    """The JSON after ``RESULT `` on a line of the run's stdout; fails with its output's tail
    when the run failed or printed none."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-tail:] + proc.stderr[-tail:]
    return json.loads(lines[0][len("RESULT ") :])


class MainRun:
    """A ``python -m mcibi_jax.main`` subprocess whose output lines are collected as they come."""

    def __init__(self, args: list[str], **env: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mcibi_jax.main", *args],
            cwd=REPO,
            env=subprocess_env(**env),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True
        )
        self._reader.start()

    def wait_for(self, pattern: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if re.search(pattern, line)]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the last lines
                found = [line for line in list(self.lines) if re.search(pattern, line)]
                if found:
                    return found[0]
                raise AssertionError(
                    f"exited ({self.proc.returncode}) before {pattern!r}:\n{self.output[-3000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output[-3000:]}")

    def finish(self, timeout: float = 600) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


# ------------------------------------------------------------------------------------------
# Small configs of the released recipes


def tiny_ade20k_config(root: Path) -> ml_collections.ConfigDict:
    """The released ADE20K r50 recipe, narrowed so that two steps run in seconds on a CPU."""
    config = mcibi_jax.load_config(
        "configs/ade20k.py:r50",
        [
            f"dataset.root={str(root)!r}",
            "dataset.train.output_size=(64, 48)",
            "dataset.train.crop_size=(32, 32)",
            "dataset.train.pad_size=(32, 32)",
            "dataset.test.output_size=(64, 48)",
            "train.batch_size=2",
            "train.num_replicas=2",
            "train.num_epochs=2",
            "train.log_every=1",
            "model.head.in_channels=128",
            "model.head.feats_channels=16",
            "model.head.transform_channels=8",
            "model.head.out_channels=16",
        ],
    )
    with config.unlocked():  # backbone options the recipe leaves at the backbone's defaults
        config.model.backbone.update(base_channels=4, stem_channels=8)
    config.model.auxiliary[0].update(in_channels=64, out_channels=16)
    return config


PIPELINE_CROP = 24


def small_ade20k_config(batch_size: int = 4, root: Path | None = None) -> ml_collections.ConfigDict:
    """The released ADE20K r50 recipe with small images and PIPELINE_CROP crops (data pipeline tests)."""
    config = released_config("ade20k", "r50")
    config.dataset.train.output_size = (64, 32)
    config.dataset.train.crop_size = (PIPELINE_CROP, PIPELINE_CROP)
    config.dataset.train.pad_size = (PIPELINE_CROP, PIPELINE_CROP)
    config.dataset.test.output_size = (64, 32)
    config.train.batch_size = batch_size
    if root is not None:
        config.dataset.root = str(root)
    return config
