"""Train and/or evaluate MCIBI.

    python -m mcibi_jax.main --config=configs/demo.py --workdir=/tmp/demo
    python -m mcibi_jax.main --config=configs/cityscapes.py:r50 --workdir=DIR --config.dataset.root=DATA

``--mode``: ``train``, ``eval`` (``eval.checkpoint``: '' the newest checkpoint in
DIR/checkpoints, 'best', or a directory) or ``train_and_eval`` (default). Training writes
DIR/config.json, the final variables as an orbax checkpoint in DIR/checkpoints/final (or, if
that is taken, DIR/checkpoints/step_<N>), and DIR/results.json (training summary, evaluation
metrics). With ``train.eval_every=N`` (epochs; 0: off) it evaluates during training and keeps
the best variables in DIR/checkpoints/best. Evaluation spreads the images over all hosts and
their devices.

The generated ``synthetic`` dataset (configs/demo.py) needs nothing on disk; the released
recipes read their dataset from ``config.dataset.root`` (layouts: docs/datasets.md) through the
Grain pipeline. Evaluation follows ``model.inference`` (whole image or sliding windows,
scales, flip), or ``eval.tta_*`` with ``--config.eval.use_tta=True``; it writes
DIR/confusion.{csv,png} unless ``--config.eval.save_confusion=False``. With
``--config.eval.format_only=True`` it scores nothing and writes the predictions of
``dataset.eval_set`` (read without labels, e.g. ``--config.dataset.eval_set=test``) for the
dataset's evaluation server to DIR/submission/<dataset>/ (see mcibi_jax.evaluation.submission).
``--config.train.ema_decay=0.9995`` keeps an EMA of the weights; the saved checkpoint and the
evaluation then use the EMA weights. Ctrl-C or SIGTERM during training saves a checkpoint in
DIR/train_state at the next step (all hosts the same) and stops; rerunning the command resumes
(see mcibi_jax.train.interrupt).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from mcibi_jax import distributed
from mcibi_jax.config import ConfigError, compute_dtype, parse_absl_command_line, usage_error
from mcibi_jax.data import synthetic
from mcibi_jax.evaluation.confusion import save_confusion
from mcibi_jax.evaluation.inference import confusion_counts, evaluation_options
from mcibi_jax.evaluation.metrics import as_percent, format_table, segmentation_metrics, to_json
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.porting.port import load_variables, save_variables, variables_from_pth
from mcibi_jax.progress import ProgressBar
from mcibi_jax.train.checkpoints import BestCheckpoint, TrainCheckpoints
from mcibi_jax.train.curves import CURVES, write_curves
from mcibi_jax.train.interrupt import StopRequests, TrainingInterrupted
from mcibi_jax.train.loop import TrainingDiverged, train
from mcibi_jax.train.writers import MetricWriter, NullWriter, rewind_records

MODES = ("train", "eval", "train_and_eval")
# Options a config may lack, with their defaults.
OPTIONAL_KEYS = {"train": {"ema_decay": 0.0, "eval_every": 0},
                 "eval": {"save_confusion": True, "format_only": False, "checkpoint": ""}}
BEST = "best"  # DIR/checkpoints/best: the variables of the best evaluation during training


class DatasetUnavailable(RuntimeError):
    """The config names a dataset that cannot be read."""


def _log(message: str) -> None:
    print(message, flush=True)


def _check_dataset(config: Mapping[str, Any]) -> None:
    if config["dataset"]["num_classes"] != config["model"]["num_classes"]:
        raise ConfigError(f"dataset.num_classes={config['dataset']['num_classes']} but "
                         f"model.num_classes={config['model']['num_classes']}")


def _dtype(config: Mapping[str, Any]):
    return compute_dtype(config.get("dtype", "float32"))


def check_train_config(config: Mapping[str, Any]) -> None:
    """Raises ConfigError for training settings this trainer cannot run."""
    train_config = config["train"]
    if int(train_config["num_epochs"]) < 1:
        raise ConfigError(f"train.num_epochs must be at least 1, got {train_config['num_epochs']}")
    batch_size, devices = int(train_config["batch_size"]), jax.device_count()
    if batch_size < 1 or batch_size % devices:
        raise ConfigError(f"train.batch_size={batch_size} must be a positive multiple of the {devices} device(s)")
    num_replicas = int(train_config.get("num_replicas", 1))
    if num_replicas < 1 or batch_size % num_replicas:
        raise ConfigError(f"train.num_replicas={num_replicas} must divide train.batch_size={batch_size} (it is the "
                          "reference's GPU count whose per-GPU loss means and memory updates are reproduced; "
                          "--config.train.num_replicas=1 uses the whole batch at once)")
    if str(train_config["optimizer"].get("name", "sgd")).lower() != "sgd":
        raise ConfigError(f"train.optimizer.name={train_config['optimizer']['name']!r}: only 'sgd' is implemented")
    if train_config["schedule"].get("name", "poly") != "poly":
        raise ConfigError(f"train.schedule.name={train_config['schedule']['name']!r}: only 'poly' is implemented")
    ema_decay = float(train_config.get("ema_decay", 0.0) or 0.0)
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={ema_decay} must be in [0, 1) (0 = off; decay = 1 - the reference's EMA momentum)")


def _option(config: Mapping[str, Any], section: str, key: str) -> Any:
    node = config.get(section, None) or {}
    return node.get(key, OPTIONAL_KEYS[section][key])


def _split(config: Mapping[str, Any], which: str) -> tuple[np.ndarray, np.ndarray]:
    data = config["dataset"]
    return synthetic.make_split(int(data[which]["seed"]), int(data[which]["num_images"]), tuple(data["image_size"]),
                                int(data["num_classes"]))


def _initial_variables(config: Mapping[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """``train.init_from``: an orbax checkpoint directory, a released .pth or ``pretrained:<name>``
    (a released checkpoint by name, downloaded and cached) (fine-tuning)."""
    source = str(config["train"].get("init_from", "") or "")
    if not source:
        return None
    from mcibi_jax import pretrained
    from mcibi_jax.porting.convert import PortError
    from mcibi_jax.porting.pth import PthError

    try:
        if source.startswith(pretrained.PREFIX):
            variables = pretrained.load_variables(source, config, log=log)
        elif source.endswith((".pth", ".pt")):
            variables = variables_from_pth(source, config)
        else:
            variables = load_variables(source, config)
    except (PortError, PthError, pretrained.PretrainedError) as error:
        raise ConfigError(f"train.init_from={source}: {error}") from None
    log(f"initialised from {source}")
    return variables


class TrainingData:
    """The training batches of a run: ``epoch(e)`` yields epoch e's host batches; ``state()`` and
    ``restore(state)`` save and restore the input pipeline's position with the checkpoints."""

    def __init__(self, config: Mapping[str, Any]):
        self.batch_size = int(config["train"]["batch_size"])
        self._config = config
        if config["dataset"]["name"] == "synthetic":
            self._images, self._labels = _split(config, "train")
            self.num_images = len(self._images)
            self.image_size = tuple(config["dataset"]["image_size"])
        else:
            from mcibi_jax.data import pipeline

            self._pipeline = pipeline
            source = _source(config, config["dataset"]["train_set"])
            self.num_images = len(source)
            self.image_size = tuple(config["dataset"]["train"]["crop_size"])
            self._loader = pipeline.train_loader(config, source=source)
            self._iterator = iter(self._loader)
        self.steps_per_epoch = self.num_images // self.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{self.num_images} training images do not make one batch of {self.batch_size}")

    def epoch(self, epoch: int, skip: int = 0):
        """Epoch ``epoch``'s host batches after the first ``skip`` (trained before a resume)."""
        if self._config["dataset"]["name"] == "synthetic":  # a pure function of the epoch
            seed = int(self._config["train"].get("seed", 0))
            flip_prob = float(self._config["dataset"]["train"].get("flip_prob", 0.0))
            host, hosts = jax.process_index(), jax.process_count()
            batches = synthetic.batches(self._images, self._labels, self.batch_size, seed=seed, epoch=epoch, flip_prob=flip_prob)
            for batch in itertools.islice(batches, skip, None):
                part = self.batch_size // hosts  # each host feeds its slice of the global batch
                yield {k: v[host * part:(host + 1) * part] for k, v in batch.items()}
            return
        for _ in range(self.steps_per_epoch - skip):  # the restored iterator is already past the skipped ones
            batch = next(self._iterator)
            yield {"images": batch["image"], "labels": batch["label"]}

    def state(self) -> Any:
        return {} if self._config["dataset"]["name"] == "synthetic" else self._pipeline.iterator_state(self._iterator)

    def restore(self, state: Any) -> None:
        if self._config["dataset"]["name"] != "synthetic" and state:
            try:
                self._iterator = self._pipeline.restore_iterator(self._loader, state)
            except ValueError as error:
                raise ConfigError(f"cannot resume the input pipeline of process {jax.process_index()}: {error}. "
                                  "Resume with the dataset, batch size and processes of the checkpoint, or use a new "
                                  "--workdir.") from None


def _evaluation_data(config: Mapping[str, Any]) -> tuple[Any, int, list[str]]:
    """(this process's batches of {"images", "labels"}, number of images of all processes, class
    names) of the held-out set."""
    num_classes = int(config["dataset"]["num_classes"])
    if config["dataset"]["name"] == "synthetic":
        images, labels = _split(config, "test")
        share = np.array_split(np.arange(len(images)), jax.process_count())[jax.process_index()]
        mine_images, mine_labels = images[share], labels[share]  # each process scores its own share
        eval_batch = max(1, int(config["eval"].get("batch_size", 1)))
        batches = ({"images": mine_images[i:i + eval_batch], "labels": mine_labels[i:i + eval_batch]}
                   for i in range(0, len(mine_images), eval_batch))
        return batches, len(images), synthetic.class_names(num_classes)

    from mcibi_jax.data import pipeline

    source = _source(config, config["dataset"]["eval_set"])
    # Each image at its own size; padding items of a host (valid=False) are not scored.
    batches = ({"images": item["image"], "labels": item["label"]} for item in pipeline.eval_loader(config, source=source) if item["valid"].all())
    return batches, len(source), list(source.class_names)


def _submission_data(config: Mapping[str, Any]) -> tuple[Any, int]:
    """(evaluation-loader items with "id", number of images) of ``dataset.eval_set``, read
    without labels."""
    if config["dataset"]["name"] == "synthetic":
        raise ConfigError("eval.format_only writes files for a dataset's evaluation server; the synthetic dataset has none")
    from mcibi_jax.data import pipeline

    source = _source(config, config["dataset"]["eval_set"], with_labels=False)
    return pipeline.eval_loader(config, source=source), len(source)


def _source(config: Mapping[str, Any], split: str, with_labels: bool = True):
    from mcibi_jax.data.datasets import DatasetError, build_source

    try:
        return build_source(config["dataset"], split, with_labels=with_labels)
    except DatasetError as error:
        raise DatasetUnavailable(f"{error}\n(see docs/datasets.md for the expected layout; set --config.dataset.root=...)") from None


def new_checkpoint_dir(workdir: Path, step: int) -> Path:
    """DIR/checkpoints/final, or DIR/checkpoints/step_<N>[_<i>] when that is already taken."""
    root = workdir / "checkpoints"
    candidates = [root / "final", root / f"step_{step}"] + [root / f"step_{step}_{i}" for i in range(1, 1000)]
    for path in candidates:
        if not path.exists() or not any(path.iterdir()):
            return path
    raise FileExistsError(f"no free checkpoint directory under {root}")


def latest_checkpoint(workdir: Path) -> Path:
    """The newest exported checkpoint under DIR/checkpoints (the best-so-far one aside)."""
    root = workdir / "checkpoints"
    found = [p for p in root.glob("*") if p.is_dir() and not p.name.startswith(BEST) and any(p.iterdir())] if root.is_dir() else []
    if not found:
        raise FileNotFoundError(f"no checkpoint under {root}; train first (--mode=train or train_and_eval)")
    return max(found, key=lambda p: p.stat().st_mtime)


def checkpoint_to_evaluate(workdir: Path, choice: str) -> Path:
    """``eval.checkpoint``: '' (the newest), 'best' (the best evaluation during training) or a
    checkpoint directory."""
    if not choice:
        return latest_checkpoint(workdir)
    path = workdir / "checkpoints" / BEST if choice == BEST else Path(choice).absolute()
    if not path.is_dir():
        hint = " (it is written when train.eval_every > 0 or in --mode=train_and_eval)" if choice == BEST else ""
        raise FileNotFoundError(f"eval.checkpoint={choice!r}: no checkpoint at {path}{hint}")
    return path


def _write_results(workdir: Path, update: dict[str, Any], merge: bool) -> Path:
    """Writes DIR/results.json; ``merge`` keeps what an earlier run wrote (an eval after training)."""
    path = workdir / "results.json"
    results = json.loads(path.read_text()) if merge and path.exists() else {}
    results.update(update)
    path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    return path


def evaluate_variables(model: Any, variables: Mapping[str, Any], config: Mapping[str, Any], workdir: Path,
                       log: Callable[[str], None], *, detailed: bool = True) -> dict[str, Any]:
    """Scores ``variables`` on ``dataset.eval_set`` under the config's inference settings, spread
    over all processes and their devices; returns the ``eval`` section of results.json. ``detailed``
    logs the per-class table and writes the confusion matrix (``eval.save_confusion``)."""
    batches, num_images, names = _evaluation_data(config)
    started = time.perf_counter()
    progress = ProgressBar(num_images, "evaluating", enabled=None if detailed and distributed.is_main_process() else False)

    def on_batch(n: int) -> None:  # images of all processes, assuming they keep pace with this one
        progress.update(min(n * jax.process_count(), num_images - progress.done))

    with progress:
        counts = confusion_counts(model, variables, batches, num_classes=int(config["dataset"]["num_classes"]),
                                  ignore_label=int(config["dataset"].get("ignore_label", -100)), on_batch=on_batch,
                                  **evaluation_options(config))
    metrics = segmentation_metrics(counts)
    seconds = time.perf_counter() - started
    if detailed:
        if _option(config, "eval", "save_confusion") and distributed.is_main_process():
            csv_path, png_path = save_confusion(workdir, counts, names)
            log(f"wrote the confusion matrix to {csv_path} and {png_path}")
        log(f"evaluation on {num_images} held-out images ({seconds:.1f}s on {jax.device_count()} device(s)):")
        log(format_table(metrics, names))
    if counts.sum() == 0:
        log(f"warning: {config['dataset']['eval_set']!r} has no labelled pixels, so no metrics (a test split? "
            "score it with --config.eval.format_only=True, or evaluate --config.dataset.eval_set=val)")
    clean = to_json(as_percent(metrics))  # percent, as the table above and the reference's logs
    return {
        "num_images": num_images, "seconds": round(seconds, 1), "mIoU": clean["mIoU"], "aAcc": clean["aAcc"],
        "mAcc": clean["mAcc"], "IoU": dict(zip(names, clean["IoU"])), "Acc": dict(zip(names, clean["Acc"])),
    }


def _scalar(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _draw_curves(workdir: Path, log: Callable[[str], None]) -> None:
    """Redraws WORKDIR/curves.png from metrics.jsonl (process 0); a failure is only reported."""
    if not distributed.is_main_process():
        return
    try:
        write_curves(workdir)
    except Exception as error:  # a picture is never worth stopping a run for
        log(f"warning: could not draw {workdir / CURVES}: {type(error).__name__}: {error}")


class EpochEvaluation:
    """The ``after_epoch`` hook of training: evaluates the exported variables every
    ``train.eval_every`` epochs (0: never) and, with ``final``, after the last one (in detail);
    keeps the best result in DIR/checkpoints/best and records ``eval/*`` scalars."""

    def __init__(self, model: Any, config: Mapping[str, Any], workdir: Path, log: Callable[[str], None],
                 writer: Any, final: bool):
        self.model, self.config, self.workdir, self.log, self.writer = model, config, workdir, log, writer
        self.every = max(0, int(_option(config, "train", "eval_every") or 0))
        self.num_epochs, self.final = int(config["train"]["num_epochs"]), final
        self.enabled = self.final or self.every > 0
        self.best = BestCheckpoint(workdir / "checkpoints" / BEST) if self.enabled else None
        self.last_result: dict[str, Any] | None = None
        self.training_bar: ProgressBar | None = None  # closed before the final evaluation draws its own

    def due(self, epoch: int) -> bool:
        last = epoch == self.num_epochs
        return (last and self.final) or (self.every > 0 and (epoch % self.every == 0 or last))

    def __call__(self, epoch: int, state: Any) -> None:
        if self.due(epoch):
            self.evaluate(state.export_variables, int(state.step), epoch)

    def evaluate(self, variables: Mapping[str, Any], step: int, epoch: int) -> dict[str, Any]:
        last = epoch == self.num_epochs
        if last and self.training_bar is not None:
            self.training_bar.close()
        result = evaluate_variables(self.model, variables, self.config, self.workdir, self.log, detailed=last)
        self.writer.write_scalars(step, {f"eval/{k}": _scalar(result[k]) for k in ("mIoU", "aAcc", "mAcc")})
        _draw_curves(self.workdir, self.log)
        improved = self.best.offer(variables, result, step=step, epoch=epoch)
        best = self.best.record or {}
        self.log(f"epoch {epoch} evaluation: mIoU {_scalar(result['mIoU']):.2f} aAcc {_scalar(result['aAcc']):.2f} "
                 f"mAcc {_scalar(result['mAcc']):.2f} ({result['seconds']:.1f}s)"
                 + (f"; new best, saved to {self.best.directory}" if improved else
                    f"; best {best['mIoU']:.2f} at epoch {best['epoch']}" if best else ""))
        if last:
            self.last_result = result
        return result


def run(config: Any, workdir: str | os.PathLike, mode: str = "train_and_eval", log: Callable[[str], None] = _log,
        handle_signals: bool = False) -> dict[str, Any]:
    """Runs ``mode`` for ``config`` in ``workdir`` and returns what went into results.json.

    ``handle_signals``: during training, SIGINT / SIGTERM save a checkpoint at the next step
    (every host the same) and raise :class:`TrainingInterrupted` (see
    :mod:`mcibi_jax.train.interrupt`); a second signal ends the process at once."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    _check_dataset(config)
    evaluation_options(config)  # bad inference settings fail before any training
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(config["model"], dtype=_dtype(config))
    update: dict[str, Any] = {"name": config.get("name", ""), "dataset": config["dataset"]["name"]}
    format_only = mode in ("eval", "train_and_eval") and _option(config, "eval", "format_only")
    evaluation = None

    if mode in ("train", "train_and_eval"):
        check_train_config(config)
        if distributed.is_main_process():
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        data = TrainingData(config)
        checkpoints = TrainCheckpoints(workdir / "train_state", keep=int(config["train"].get("keep_checkpoints", 3)))
        earlier: list[dict[str, Any]] = []  # what earlier launches of this run logged, up to where it resumes
        if distributed.is_main_process():
            resumed_from = checkpoints.latest_step() or 0
            trained = resumed_from >= int(config["train"]["num_epochs"]) * data.steps_per_epoch
            earlier = [r for r in rewind_records(workdir, resumed_from, redo_evaluation=trained and mode == "train_and_eval")
                       if "loss" in r]
        writer = MetricWriter(workdir) if distributed.is_main_process() else NullWriter()
        writer.write_hparams(config)
        bar = ProgressBar(int(config["train"]["num_epochs"]) * data.steps_per_epoch, "training",
                          enabled=None if distributed.is_main_process() else False)
        train_log = bar.interleave(log)
        if not format_only:
            evaluation = EpochEvaluation(model, config, workdir, train_log, writer, final=mode == "train_and_eval")
            evaluation.training_bar = bar
        started = time.perf_counter()
        stop = StopRequests(abort=_abort, check_every=int(config["train"].get("log_every", 50))) if handle_signals else None
        try:
            with bar, stop or contextlib.nullcontext():
                state, history = train(model, config, data.epoch, data.steps_per_epoch, data.image_size, log=train_log,
                                       checkpoints=checkpoints, data_state=data.state, restore_data=data.restore,
                                       initial_variables=_initial_variables(config, train_log), record=writer.write_scalars,
                                       after_epoch=evaluation if evaluation is not None and evaluation.enabled else None,
                                       progress=bar, stop=stop)
            seconds = time.perf_counter() - started
            history = earlier + history  # results.json describes the whole run, from step 1
            variables = state.export_variables
            if mode == "train_and_eval" and evaluation is not None and evaluation.last_result is None:
                # resumed after the last epoch: no epoch ended in this run
                evaluation.evaluate(variables, int(state.step), evaluation.num_epochs)
        finally:
            checkpoints.close()
            writer.close()
        _draw_curves(workdir, log)
        checkpoint = save_variables(new_checkpoint_dir(workdir, int(state.step)), variables)
        if state.ema_params is not None:
            log(f"using the EMA weights (train.ema_decay={config['train']['ema_decay']}) for the checkpoint and the evaluation")
        log(f"saved the {'EMA ' if state.ema_params is not None else ''}variables to {checkpoint}")
        update["train"] = {
            "steps": int(state.step), "seconds": round(seconds, 1),
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None, "history": history,
        }
        update["checkpoint"] = str(checkpoint)
        if state.ema_params is not None:
            update["ema_decay"] = float(config["train"]["ema_decay"])
        if evaluation is not None and evaluation.best is not None and evaluation.best.record is not None:
            update["best"] = {**evaluation.best.record, "checkpoint": str(evaluation.best.directory)}
    else:
        checkpoint = checkpoint_to_evaluate(workdir, str(_option(config, "eval", "checkpoint") or ""))
        log(f"evaluating {checkpoint}")
        variables = load_variables(checkpoint, config)
        update["checkpoint"] = str(checkpoint)

    if format_only:
        from mcibi_jax.evaluation.submission import write_submission

        items, num_images = _submission_data(config)
        directory = workdir / "submission" / config["dataset"]["name"]
        started = time.perf_counter()
        written = write_submission(model, variables, items, config["dataset"]["name"], directory, log=log,
                                   **evaluation_options(config))
        log(f"wrote {len(written)} predictions of {num_images} {config['dataset']['eval_set']} images to {directory} "
            f"({time.perf_counter() - started:.1f}s); no metrics (eval.format_only)")
        update["submission"] = {"directory": str(directory), "num_images": len(written), "split": str(config["dataset"]["eval_set"])}
    elif mode == "eval":
        update["eval"] = evaluate_variables(model, variables, config, workdir, log)
    elif mode == "train_and_eval":
        update["eval"] = evaluation.last_result
    if distributed.is_main_process():
        log(f"wrote {_write_results(workdir, update, merge=mode == 'eval')}")
    return update


# The command line absl parses: sys.argv without the --config.<key> overrides, which we apply
# ourselves after the file is loaded. ml_collections would resolve them by attribute first,
# so keys such as model.head.update.* (ConfigDict.update is a method) could not be set, and an
# unknown key would end in a traceback instead of a message.
_ARGV: list[str] = []
# The absl flag holders, defined only when this module runs as the program.
_CONFIG = _WORKDIR = _MODE = None


def _parse_command_line(argv: list[str]) -> list[str]:
    return parse_absl_command_line(argv, _CONFIG, _ARGV)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", None, "config file, e.g. configs/demo.py or configs/cityscapes.py:r50; "
        "then --config.<key>=<value> to change single values", sys_argv=_ARGV,
    )
    workdir = flags.DEFINE_string("workdir", None, "directory for checkpoints and results")
    mode = flags.DEFINE_enum("mode", "train_and_eval", MODES, "what to run")
    flags.mark_flags_as_required(["config", "workdir"])
    return config, workdir, mode


def _abort(message: str, code: int) -> None:
    """Ends this process now, and with it every process of a multi-process run."""
    if jax.process_count() > 1:
        distributed.fail_all(message, shown=True, code=code)
    os._exit(code)


def _resume_command() -> str:
    return shlex.join([os.path.basename(sys.executable), "-m", "mcibi_jax.main", *sys.argv[1:]])


def _interrupted(stopped: TrainingInterrupted) -> int:
    """Reports an interrupted training (one line, process 0) and returns the exit status."""
    if distributed.is_main_process():
        where = f"saved {stopped.checkpoint}" if stopped.checkpoint else "nothing saved"
        hosts = " on every host" if jax.process_count() > 1 else ""
        print(f"stopped by {stopped.signal_name} at step {stopped.step}/{stopped.total_steps}; {where}. "
              f"Resume with the same command{hosts}: {_resume_command()}", file=sys.stderr, flush=True)
    number = getattr(signal.Signals, stopped.signal_name, None) if stopped.signal_name.startswith("SIG") else None
    return 128 + int(number or signal.SIGTERM)


def _fail(message: str, shown: bool = False, code: int = 1) -> None:
    """Reports a failure once and exits; in a multi-process run every process stops."""
    if jax.process_count() > 1:
        distributed.fail_all(message, shown=shown, code=code)
    if not shown:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage_error(f"unexpected arguments {argv[1:]}")
    from absl import logging as absl_logging

    # Our progress lines go to stdout; keep the libraries' (orbax's) INFO chatter out of them.
    if absl_logging.get_verbosity() == absl_logging.INFO:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        distributed.initialize()
        distributed.watch_peers()  # another process's failure ends this one too
        log = _log if distributed.is_main_process() else (lambda message: None)
        run(_CONFIG.value, _WORKDIR.value, _MODE.value, log=log, handle_signals=True)
    except (ConfigError, DatasetUnavailable, TrainingDiverged, NotImplementedError, FileNotFoundError, FileExistsError,
            distributed.DistributedConfigError) as error:
        _fail(str(error))
    except TrainingInterrupted as stopped:
        raise SystemExit(_interrupted(stopped)) from None
    except KeyboardInterrupt:  # outside training (which saves first)
        _fail(f"interrupted on process {jax.process_index()}", code=130)
    except Exception as error:
        if jax.process_count() == 1:
            raise
        traceback.print_exc()
        _fail(f"{type(error).__name__}: {error}", shown=True)


if __name__ == "__main__":
    from absl import app

    _CONFIG, _WORKDIR, _MODE = _define_flags()
    app.run(main, flags_parser=_parse_command_line)
