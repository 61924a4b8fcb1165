"""mcibi_jax against a PyTorch MCIBI on this CPU: same weights, same input, one run.

    python benchmarks/vs_torch.py                          # R-50 and R-101: forward 1x512x512, train step 2x256x256
    python benchmarks/vs_torch.py --models=r50 --repeats=5
    python benchmarks/vs_torch.py --tasks=forward --forward_size=256x256
    python benchmarks/vs_torch.py --models=s101,hrnet48,vitl   # ResNeSt-101, HRNet-W48, ViT-L

Needs the benchmark extra (``pip install -e '.[bench]'``: torch). Each model is its released
recipe (``configs/cityscapes.py``; ViT-L, released only for ADE20k: ``configs/ade20k.py``). The
PyTorch side is ``torch_mcibi.TorchMCIBI`` on a ``torch_backbones`` backbone (a plain ``torch.nn``
network of the same layers; the reference package itself needs torchvision and CUDA-era pins),
built from the same ``config.model``; it loads our randomly initialised
variables through ``variables_to_state_dict``, and the forward logits of both sides are
compared first (``max |diff|``) so that both compute the same function.

Each side runs in its own subprocess (so that its peak memory is its own): both are set
up, then their timed runs alternate (``--repeats`` of each, after one warm-up run each;
medians reported), each timed run right after ``--settle_runs`` untimed runs of the same side,
so that it times a step the way a training loop runs it, after a step of its own: a step right
after the other side's measured up to 1.4x its time (ours, ViT-L train: the other process had
just given back gigabytes, and XLA's per-step buffers faulted their pages in slowly). Peak host
memory growth is ``ru_maxrss`` at the end minus the resident set once the weights and the batch
are loaded (it includes our compilation). The figure "after warm-up" is the peak of the timed runs alone, against the same base: after the warm-up
run each side gives its freed heap back to the OS (``release_free_host_memory``, as the
training loop does after compiling) and the kernel's peak (VmHWM) is reset. The train
step is the recipe's SGD (momentum 0.9; its weight decay and per-module rates: ViT-L's backbone
at a tenth) on the weighted stage-1, stage-2 and auxiliary cross-entropies with the memory
update: our ``make_train_step``, and the same loop written in PyTorch (constant lr: ours decays
it by under 1e-4 over a few steps; no memory loss: ours adds it after the first epoch only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchmark_args import parse_size

REPO = Path(__file__).resolve().parents[1]
# time the mcibi_jax of this checkout, wherever the package is installed
sys.path.insert(0, str(REPO))

# name -> (recipe, row label)
MODELS = {
    "r50": ("cityscapes", "R-50"),
    "r101": ("cityscapes", "R-101"),
    "s101": ("cityscapes", "ResNeSt-101"),
    "hrnet48": ("cityscapes", "HRNet-W48"),
    "vitl": ("ade20k", "ViT-L"),
}
# --tiny: a narrow model for smoke tests (head widths; each backbone is narrowed in our_config)
TINY = dict(base=8, channels=16, transform=8, aux_channels=16)
TINY_VIT = dict(embed_dims=32, num_layers=4, num_heads=2, out_indices=(0, 1, 2, 3))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets the kernel's peak resident set (VmHWM) to the current one (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# ----------------------------------------------------------------------------------------- our side


def our_config(name: str, tiny: bool = False, dropout: bool = True):
    """Our config of ``name`` (its released recipe); ``tiny``: narrow widths; ``dropout=False``:
    no channel dropout in the heads (so that both sides' training losses can be compared)."""
    import mcibi_jax

    recipe = MODELS[name][0]
    config = mcibi_jax.load_config(str(REPO / "configs" / f"{recipe}.py:{name}"))
    m = config.model
    if tiny:
        widths = TINY
        backbone = m.backbone
        if backbone.type == "HRNet":
            backbone.arch = "hrnetv2_tiny"
            m.head.in_channels = aux_in = 4 + 8 + 16 + 32
        elif backbone.type == "VisionTransformer":
            backbone.update(TINY_VIT, img_size=(64, 64))
            m.head.in_channels = aux_in = TINY_VIT["embed_dims"]
            m.head.level_norm_channels = [TINY_VIT["embed_dims"]] * 4
        else:
            base = widths["base"]
            stem = base * 2 if backbone.type == "ResNeSt" else base
            with config.unlocked():  # options the recipe leaves at the backbone's defaults
                backbone.update(base_channels=base, stem_channels=stem)
            m.head.in_channels, aux_in = base * 32, base * 16
        m.head.feats_channels = m.head.out_channels = widths["channels"]
        m.head.transform_channels = widths["transform"]
        m.auxiliary = [
            {**dict(aux), "in_channels": aux_in, "out_channels": widths["aux_channels"]}
            for aux in m.auxiliary
        ]
    if not dropout:
        m.head.dropout = 0.0
        m.auxiliary = [{**dict(aux), "dropout": 0.0} for aux in m.auxiliary]
    return config


def torch_model_config(config) -> dict:
    """``config.model`` as a plain dict for ``torch_mcibi.build_torch_mcibi``."""
    import dataclasses

    model = config.model.to_dict()
    if model["backbone"]["type"] == "HRNet":
        from mcibi_jax.models.backbones.hrnet import hrnet_stages

        stages = hrnet_stages(model["backbone"]["arch"])
        model["backbone"]["arch"] = [dataclasses.asdict(stage) for stage in stages]
    return model


def make_weights(config, path: Path, seed: int = 0) -> None:
    """Random variables of our model (non-trivial BatchNorm statistics and memory), saved as a state_dict."""
    import jax
    import jax.numpy as jnp

    from mcibi_jax.models.segmentor import build_model
    from mcibi_jax.porting.convert import variables_to_state_dict

    model = build_model(config.model)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)), train=False))(
        jax.random.key(seed, impl="rbg")
    )
    state = variables_to_state_dict(variables)
    rng = np.random.default_rng(seed)
    for key, value in state.items():
        if key.endswith("running_mean"):
            state[key] = rng.normal(0, 0.1, value.shape).astype(np.float32)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif key.endswith("memory"):
            state[key] = rng.normal(0, 1, value.shape).astype(np.float32)
    np.savez(path, **state)


class OurSide:
    def __init__(self, task: str, config, weights: Path, batch: dict):
        import jax
        import jax.numpy as jnp

        from mcibi_jax.models.segmentor import build_model
        from mcibi_jax.porting.variables import variables_from_state_dict

        self.jax = jax
        state = dict(np.load(weights))
        variables = variables_from_state_dict(state, config)
        model = build_model(config.model)
        if task == "forward":
            self.images = jnp.asarray(batch["images"])
            self.variables = jax.device_put(variables)
            self.fn = jax.jit(lambda v, x: model.apply(v, x, train=False)["stage2"])
            self.call = lambda: self.fn(self.variables, self.images)
        else:
            from mcibi_jax.sharding import data_mesh, global_batch, replicated_sharding
            from mcibi_jax.train.optimizer import optimizer_from_config
            from mcibi_jax.train.state import create_train_state
            from mcibi_jax.train.step import make_train_step

            mesh = data_mesh()
            train_config = config.train.to_dict()
            tx, schedule = optimizer_from_config(variables["params"], train_config, 1000)
            self.state = jax.device_put(
                create_train_state(variables, tx), replicated_sharding(mesh)
            )
            self.batch = global_batch({"images": batch["images"], "labels": batch["labels"]}, mesh)
            self.key = jax.device_put(jax.random.key(1), replicated_sharding(mesh))
            self.step = make_train_step(
                model,
                config.model.to_dict(),
                tx,
                schedule,
                1000,
                mesh,
                int(config.dataset.get("ignore_label", -100)),
                1,
            )

            def call():
                self.state, metrics = self.step(self.state, self.batch, self.key)
                return metrics["loss"]

            self.call = call
        del state, variables

    def run(self):
        out = self.call()
        self.jax.block_until_ready(out)
        return np.asarray(out)


# --------------------------------------------------------------------------------------- torch side


class TorchSide:
    def __init__(self, task: str, config, weights: Path, batch: dict):
        import torch
        from torch_mcibi import build_torch_mcibi, segmentation_loss

        self.torch = torch
        model = build_torch_mcibi(torch_model_config(config))
        state = {k: torch.from_numpy(v) for k, v in np.load(weights).items()}
        model.load_state_dict(state, strict=True)
        del state
        images = torch.from_numpy(np.ascontiguousarray(batch["images"].transpose(0, 3, 1, 2)))
        if task == "forward":
            model.eval()

            def call():
                with torch.inference_mode():
                    return model(images)["stage2"].permute(0, 2, 3, 1)
        else:
            model.train()
            labels = torch.from_numpy(batch["labels"].astype(np.int64))
            optimizer = torch.optim.SGD(param_groups(model, config.train.optimizer), momentum=0.9)
            update = config.model.head.memory_update
            lr = config.train.optimizer.lr
            # the memory momentum of the first steps (ours follows the poly-decayed lr)
            momentum = update.base_momentum * (
                lr / update.base_lr if update.adjust_by_learning_rate else 1.0
            )
            ignore = int(config.dataset.ignore_label)
            weights = config.model.loss_weights

            def call():
                optimizer.zero_grad(set_to_none=True)
                outputs = model(images, labels, memory_momentum=momentum, ignore_label=ignore)
                loss = segmentation_loss(outputs, labels, weights, ignore)
                loss.backward()
                optimizer.step()
                return loss.detach()

        self.call = call

    def run(self):
        return self.call().numpy()


def param_groups(model, optimizer) -> list[dict]:
    """SGD groups of ``config.train.optimizer``: ``param_rules`` scale the lr and weight decay of
    the top-level modules they name (ViT-L: the backbone at a tenth of the rate)."""
    rules = optimizer.param_rules.to_dict() if optimizer.param_rules else {}
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.split(".")[0] if name.split(".")[0] in rules else "", []).append(
                p
            )
    return [
        {
            "params": params,
            "lr": optimizer.lr * rules.get(top, {}).get("lr_multiplier", 1.0),
            "weight_decay": optimizer.weight_decay * rules.get(top, {}).get("wd_multiplier", 1.0),
        }
        for top, params in groups.items()
    ]


def worker(args) -> None:
    """Sets one side up, then answers 'run' (one timed call) and 'done' (figures) on stdin."""
    from mcibi_jax.host_memory import release_free_host_memory

    batch = dict(np.load(args.batch))
    side = (OurSide if args.worker == "ours" else TorchSide)(
        args.task, our_config(args.model, args.tiny), Path(args.weights), batch
    )
    base = current_rss()
    print("ready", flush=True)
    out, runs, steady = None, 0, False
    for line in sys.stdin:
        if line.strip() == "run":
            if runs == 1:  # after the warm-up (and, for us, compilation) run
                release_free_host_memory()
                steady = reset_peak_rss()
            start = time.perf_counter()
            out = side.run()
            runs += 1
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
        else:
            np.save(args.output, out)
            figures = {
                "peak_growth": peak_rss() - base,
                "steady_growth": peak_rss_since_reset() - base if steady else None,
            }
            print(json.dumps(figures), flush=True)
            return


# ------------------------------------------------------------------------------------------ driver


class Worker:
    def __init__(
        self, side: str, task: str, model: str, files: dict, tiny: bool, threads: int | None
    ):
        cmd = [
            sys.executable,
            __file__,
            f"--worker={side}",
            f"--task={task}",
            f"--model={model}",
            f"--weights={files['weights']}",
            f"--batch={files[task]}",
            f"--output={files['out_' + side]}",
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        if tiny:
            cmd.append("--tiny")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        self._expect("ready")

    def _expect(self, word: str | None = None) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"a benchmark worker died (exit {self.proc.wait()}); see its error above"
            )
        if word is not None and line.strip() != word:
            raise RuntimeError(f"unexpected worker answer {line!r}")
        return line

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return json.loads(self._expect())["seconds"]

    def finish(self) -> dict:
        """{'peak_growth': bytes, 'steady_growth': bytes or None} (see ``worker``)."""
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        figures = json.loads(self._expect())
        self.proc.wait()
        return figures


def compare(
    task: str,
    name: str,
    size: tuple[int, int],
    batch_size: int,
    repeats: int,
    tiny: bool,
    tmp: Path,
    settle_runs: int = 1,
) -> dict:
    config = our_config(name, tiny)
    num_classes = config.model.num_classes
    rng = np.random.default_rng(0)
    files = {
        "weights": tmp / f"weights_{name}.npz",
        task: tmp / f"{task}.npz",
        "out_ours": tmp / "ours.npy",
        "out_torch": tmp / "torch.npy",
    }
    if not files["weights"].exists():
        make_weights(config, files["weights"])
    np.savez(
        files[task],
        images=rng.standard_normal((batch_size, *size, 3), dtype=np.float32),
        labels=rng.integers(0, num_classes, (batch_size, *size), dtype=np.int32),
    )
    workers = {}
    for side in ("ours", "torch"):  # one side set up at a time: their set-up peaks do not overlap
        workers[side] = Worker(side, task, name, files, tiny, None)
    times = {side: [] for side in workers}
    for round_ in range(repeats + 1):  # the first (warm-up, compilation) run of each is dropped
        for side, w in workers.items():
            for _ in range(settle_runs if round_ else 0):
                w.run()
            times[side].append(w.run())
    growth = {side: w.finish() for side, w in workers.items()}
    result = {
        "task": task,
        "model": MODELS[name][1],
        "size": f"{batch_size}x{size[0]}x{size[1]}",
        **{f"{s}_s": float(np.median(t[1:])) for s, t in times.items()},
        **{f"{s}_{k}": v for s, g in growth.items() for k, v in g.items()},
    }
    ours, theirs = np.load(files["out_ours"]), np.load(files["out_torch"])
    if task == "forward":
        result["max_abs_diff"] = float(np.max(np.abs(ours - theirs)))
        result["max_abs_logit"] = float(np.max(np.abs(theirs)))
    else:
        result["loss"] = (float(ours), float(theirs))
    return result


def format_row(r: dict) -> str:
    def gib(b: int | None) -> str:
        return "n/a" if b is None else f"+{b / 2**30:.2f} GiB"

    return (
        f"| {r['model']} | {r['task']} {r['size']} | {r['torch_s']:.2f} s | {r['ours_s']:.2f} s | "
        f"**{r['torch_s'] / r['ours_s']:.2f}x** | {gib(r['torch_peak_growth'])} | {gib(r['ours_peak_growth'])} | "
        f"{gib(r['torch_steady_growth'])} | {gib(r['ours_steady_growth'])} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="r50,r101", help=f"comma-separated among {', '.join(MODELS)}"
    )
    parser.add_argument("--tasks", default="forward,train", help="forward and/or train")
    parser.add_argument("--forward_size", type=parse_size, default=(512, 512))
    parser.add_argument("--train_size", type=parse_size, default=(256, 256))
    parser.add_argument("--forward_batch", type=int, default=1)
    parser.add_argument("--train_batch", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each side (after one warm-up run)"
    )
    parser.add_argument(
        "--settle_runs",
        type=int,
        default=1,
        help="untimed runs of a side right before each of its timed runs",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="narrow layers (a quick smoke test, not a benchmark)"
    )
    parser.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        import torch
    except ImportError:
        parser.exit(1, "vs_torch.py needs PyTorch: pip install -e '.[bench]'\n")
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    tasks = [t.strip() for t in args.tasks.split(",")]
    if (
        unknown
        or not set(tasks) <= {"forward", "train"}
        or args.repeats < 1
        or args.settle_runs < 0
    ):
        parser.error(
            f"--models among {', '.join(MODELS)}, --tasks among forward,train, --repeats >= 1, "
            "--settle_runs >= 0"
        )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs",
        flush=True,
    )
    print(
        "| model | work | PyTorch eager | mcibi_jax | ratio (torch / ours) | PyTorch peak host memory growth "
        "| mcibi_jax peak host memory growth | PyTorch after warm-up | mcibi_jax after warm-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for task in tasks:
                size, batch = (
                    (args.forward_size, args.forward_batch)
                    if task == "forward"
                    else (args.train_size, args.train_batch)
                )
                r = compare(
                    task, name, size, batch, args.repeats, args.tiny, Path(tmp), args.settle_runs
                )
                print(format_row(r), flush=True)
                if task == "forward":
                    notes.append(
                        f"{r['model']} forward: max |ours - torch| = {r['max_abs_diff']:.2e} "
                        f"(logits up to {r['max_abs_logit']:.2f})"
                    )
                else:
                    notes.append(
                        f"{r['model']} train: loss after the timed steps ours {r['loss'][0]:.4f}, "
                        f"torch {r['loss'][1]:.4f}"
                    )
    print("\n".join(notes))


if __name__ == "__main__":
    main()
