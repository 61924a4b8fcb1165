"""Training input pipeline throughput (augmented images per second) for 0, 1 and 2 workers.

    python benchmarks/data.py                                    # configs/ade20k.py:r50, synthetic source
    python benchmarks/data.py --config=configs/cityscapes.py:r50 --workers=0,2,4 --threads=0,4
    python benchmarks/data.py --config=configs/ade20k.py:r50 --config.dataset.root=/data/ade20k
    python benchmarks/data.py --config=configs/cityscapes.py:r50 --decode --step_ms=200 \\
        --config.train.batch_size=2                              # the loop's wait per step

Without ``--config.dataset.root`` pointing at a real dataset, it reads a synthetic source:
images of the sizes that dataset's files decode to, with label maps of a few large regions
(``--decode`` stores them as JPEG / PNG bytes and decodes them on every read, like a real
dataset). Batches are the config's per-host batch at its crop size, after the full random
training transform; the first batches (worker start-up) are not timed. One row per worker
count (processes), one column per thread count (threads preparing samples in each process).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

# Typical decoded sizes (h, w) of each dataset's training images.
REALISTIC_SIZES = {
    "ade20k": [(512, 683), (683, 512), (512, 512), (480, 640), (512, 768), (384, 512)],
    "cityscapes": [(1024, 2048)],
    "cocostuff10k": [(480, 640), (640, 480), (427, 640), (640, 427), (500, 375)],
    "lip": [(256, 192), (300, 220), (200, 150), (320, 240)],
}


class SyntheticSource:
    """``count`` samples cycling through ``sizes``: smooth colour images and blocky label maps."""

    def __init__(
        self, sizes, num_classes: int, count: int = 24, decode: bool = False, seed: int = 0
    ):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.decode = decode
        self.items = []
        for i in range(count):
            h, w = sizes[i % len(sizes)]
            grid = rng.integers(0, num_classes, size=(6, 8))
            rows, cols = np.arange(h) * 6 // h, np.arange(w) * 8 // w
            label = grid[rows[:, None], cols[None, :]].astype(np.int32)
            colours = rng.integers(0, 256, size=(num_classes, 3))
            image = np.clip(colours[label] + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(
                np.uint8
            )
            if decode:
                jpeg, png = io.BytesIO(), io.BytesIO()
                Image.fromarray(image).save(jpeg, format="JPEG", quality=90)
                Image.fromarray(label.astype(np.uint8), mode="L").save(png, format="PNG")
                self.items.append((jpeg.getvalue(), png.getvalue()))
            else:
                self.items.append((image, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image, label = self.items[index]
        if self.decode:
            from PIL import Image

            image = np.array(Image.open(io.BytesIO(image)).convert("RGB"))
            label = np.array(Image.open(io.BytesIO(label))).astype(np.int32)
        return {"image": image, "label": label, "id": str(index)}

    def __repr__(self) -> str:
        return f"SyntheticSource({len(self)}, decode={self.decode})"


def measure(config, source, workers: int, threads: int, batches: int, warmup: int) -> float:
    from mcibi_jax.data import pipeline

    loader = pipeline.train_loader(
        config,
        source=source,
        num_workers=workers,
        num_threads=threads,
        shard_options=pipeline.grain.sharding.NoSharding(),
    )
    with iter(loader) as it:
        for _ in range(warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        elapsed = time.perf_counter() - start
    assert batch["image"].shape[0] == loader.batch_size
    return batches * loader.batch_size / elapsed


def measure_loop_wait(config, source, step_s: float, batches: int, warmup: int) -> dict:
    """Seconds per step the training loop's thread spends getting its next global batch while
    the step itself takes ``step_s`` (a sleep: the devices' time, which leaves the host cores
    free), through the loop's own path (``GrainTraining.epoch``: batches made ahead in a thread)
    and with each batch made in the loop's thread when it is needed."""
    from mcibi_jax.data.pipeline import GrainTraining
    from mcibi_jax.sharding import data_mesh

    training = GrainTraining(config, source, data_mesh())
    count = min(training.steps_per_epoch, warmup + batches)
    # skip: fewer batches from the stream's current position
    made_ahead = training.epoch(1, skip=training.steps_per_epoch - count)
    made_here = (training._next_batch()[0] for _ in range(count))
    waits = {}
    for name, stream in (("made ahead", made_ahead), ("made in the loop", made_here)):
        waited = 0.0
        for i in range(count):
            started = time.perf_counter()
            next(stream)
            if i >= warmup:
                waited += time.perf_counter() - started
            time.sleep(step_s)
        waits[name] = waited / (count - warmup)
    made_ahead.close()
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/ade20k.py:r50", help="config spec, e.g. configs/lip.py:r50"
    )
    parser.add_argument(
        "--workers", default="0,1,2", help="comma-separated worker (process) counts"
    )
    parser.add_argument(
        "--threads", default="0,4", help="comma-separated thread counts per process"
    )
    parser.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument(
        "--decode", action="store_true", help="synthetic source: decode JPEG/PNG bytes on each read"
    )
    parser.add_argument(
        "--step_ms",
        type=float,
        default=0.0,
        help="instead: the training loop's wait for its batches while a step takes this long",
    )
    args, rest = parser.parse_known_args()
    overrides = []
    for arg in rest:
        if not arg.startswith("--config."):
            parser.error(
                f"unknown argument {arg!r} (config overrides look like --config.a.b=value)"
            )
        overrides.append(arg[len("--config.") :])

    import mcibi_jax
    from mcibi_jax.data.datasets import build_source

    try:
        config = mcibi_jax.load_config(args.config, overrides)
    except mcibi_jax.ConfigError as error:
        parser.error(str(error))
    real = any(o.startswith("dataset.root=") for o in overrides)
    if real:
        source = build_source(config.dataset, config.dataset.train_set)
    else:
        sizes = REALISTIC_SIZES[config.dataset.name]
        # enough samples for one epoch of the timed steps
        count = 24
        if args.step_ms > 0:
            count = max(count, int(config.train.batch_size) * (args.warmup + args.batches))
        source = SyntheticSource(
            sizes, int(config.dataset.num_classes), count=count, decode=args.decode
        )
    crop = tuple(config.dataset.train.crop_size)
    print(
        f"{args.config}: {source!r}, per-host batch {config.train.batch_size}, crop {crop[0]}x{crop[1]}, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}",
        flush=True,
    )
    if args.step_ms > 0:
        waits = measure_loop_wait(config, source, args.step_ms / 1e3, args.batches, args.warmup)
        for name, wait in waits.items():
            print(
                f"  loop's wait per {args.step_ms:.0f} ms step, batches {name}: {wait * 1e3:.1f} ms"
            )
        return
    threads = [int(t) for t in args.threads.split(",")]
    print("  images/s     " + "".join(f"{t:>3} threads " for t in threads), flush=True)
    for workers in (int(w) for w in args.workers.split(",")):
        rates = [measure(config, source, workers, t, args.batches, args.warmup) for t in threads]
        print(f"  {workers} workers " + "".join(f"{r:11.1f} " for r in rates), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
