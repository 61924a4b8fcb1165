"""The experiment behind ``python -m mcibi_jax.main`` (its docstring says what a run writes).

:func:`run` trains and/or evaluates ``config`` in a workdir: the data (chosen once by
:func:`mcibi_jax.data.experiment_data.experiment_data`), the model, the training loop
(:func:`mcibi_jax.train.loop.train`, resuming from DIR/train_state), evaluations during
training (:class:`EpochEvaluation`, the best in DIR/checkpoints/best), the exported variables
(DIR/checkpoints/final), the final evaluation or the files for a test server, and
DIR/results.json. :func:`main` is the program around it: it joins the processes of a multi-host
run, turns Ctrl-C or SIGTERM during training into a checkpoint at the next step (all hosts the
same; see mcibi_jax.train.interrupt), and ends a failure with one line and an exit status on
every host.

Sections, in the order a run goes through them: config checks, initial weights, evaluation,
training, the experiment (``run``), the program (``main``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
from absl import logging as absl_logging

from mcibi_jax import distributed, pretrained
from mcibi_jax.config import ConfigError, model_dtype
from mcibi_jax.data.experiment_data import (
    DatasetUnavailable,
    ExperimentData,
    experiment_data,
)
from mcibi_jax.evaluation.confusion import save_confusion
from mcibi_jax.evaluation.inference import confusion_counts, evaluation_options
from mcibi_jax.evaluation.metrics import (
    as_percent,
    format_table,
    segmentation_metrics,
    to_json,
)
from mcibi_jax.evaluation.submission import write_submission
from mcibi_jax.models.segmentor import build_model
from mcibi_jax.porting.convert import PortError
from mcibi_jax.porting.pth import PthError
from mcibi_jax.porting.variables import load_variables, save_variables, variables_from_pth
from mcibi_jax.progress import ProgressBar
from mcibi_jax.sharding import data_mesh
from mcibi_jax.train.checkpoints import (
    BEST,
    BestCheckpoint,
    TrainCheckpoints,
    checkpoint_to_evaluate,
    new_checkpoint_dir,
)
from mcibi_jax.train.curves import CURVES, write_curves
from mcibi_jax.train.interrupt import StopRequests, TrainingInterrupted
from mcibi_jax.train.loop import TrainingDiverged, train
from mcibi_jax.train.writers import MetricWriter, NullWriter, rewind_records

MODES = ("train", "eval", "train_and_eval")
Log = Callable[[str], None]


def _log(message: str) -> None:
    print(message, flush=True)


# ============================================================================================
# Config checks: settings this trainer cannot run fail before anything is written.


def check_dataset_config(config: Mapping[str, Any]) -> None:
    """Raises ConfigError when the dataset and the model disagree on the classes."""
    if config["dataset"]["num_classes"] != config["model"]["num_classes"]:
        raise ConfigError(
            f"dataset.num_classes={config['dataset']['num_classes']} but "
            f"model.num_classes={config['model']['num_classes']}"
        )


def check_train_config(config: Mapping[str, Any]) -> None:
    """Raises ConfigError for training settings this trainer cannot run."""
    train_config = config["train"]
    if int(train_config["num_epochs"]) < 1:
        raise ConfigError(f"train.num_epochs must be at least 1, got {train_config['num_epochs']}")
    batch_size, devices = int(train_config["batch_size"]), jax.device_count()
    if batch_size < 1 or batch_size % devices:
        raise ConfigError(
            f"train.batch_size={batch_size} must be a positive multiple of the {devices} device(s)"
        )
    num_replicas = int(train_config["num_replicas"])
    if num_replicas < 1 or batch_size % num_replicas:
        raise ConfigError(
            f"train.num_replicas={num_replicas} must divide train.batch_size="
            f"{batch_size} (it is the reference's GPU count whose per-GPU loss means "
            "and memory updates are reproduced; --config.train.num_replicas=1 uses "
            "the whole batch at once)"
        )
    optimizer, schedule = train_config["optimizer"]["name"], train_config["schedule"]["name"]
    if str(optimizer).lower() != "sgd":
        raise ConfigError(f"train.optimizer.name={optimizer!r}: only 'sgd' is implemented")
    if schedule != "poly":
        raise ConfigError(f"train.schedule.name={schedule!r}: only 'poly' is implemented")
    ema_decay = float(train_config["ema_decay"])
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(
            f"train.ema_decay={ema_decay} must be in [0, 1) (0 = off; decay = 1 - "
            "the reference's EMA momentum)"
        )


# ============================================================================================
# Initial weights


def initial_variables(config: Mapping[str, Any], log: Log) -> dict[str, Any] | None:
    """``train.init_from``: '' (a random initialisation: None), an orbax checkpoint directory, a
    released .pth or ``pretrained:<name>`` (a released checkpoint by name, downloaded and
    cached)."""
    source = str(config["train"]["init_from"])
    if not source:
        return None

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


# ============================================================================================
# Evaluation


def evaluate_variables(
    model: Any,
    variables: Mapping[str, Any],
    data: ExperimentData,
    config: Mapping[str, Any],
    workdir: Path,
    log: Log,
    *,
    detailed: bool = True,
) -> dict[str, Any]:
    """Scores ``variables`` on ``dataset.eval_set`` under the config's inference settings, spread
    over all processes and their devices; returns the ``eval`` section of results.json.
    ``detailed`` logs the per-class table and writes the confusion matrix
    (``eval.save_confusion``)."""
    batches, num_images, names = data.evaluation()
    started = time.perf_counter()
    progress = ProgressBar(
        num_images,
        "evaluating",
        enabled=None if detailed and distributed.is_main_process() else False,
    )

    def on_batch(n: int) -> None:  # images of all processes, assuming they keep pace with this one
        progress.update(min(n * jax.process_count(), num_images - progress.done))

    with progress:
        counts = confusion_counts(
            model,
            variables,
            batches,
            num_classes=int(config["dataset"]["num_classes"]),
            ignore_label=int(config["dataset"]["ignore_label"]),
            on_batch=on_batch,
            **evaluation_options(config),
        )
    metrics = segmentation_metrics(counts)
    seconds = time.perf_counter() - started
    if detailed:  # the scores first: a file that cannot be written loses nothing else
        log(
            f"evaluation on {num_images} held-out images ({seconds:.1f}s on "
            f"{jax.device_count()} device(s)):"
        )
        log(format_table(metrics, names))
        if config["eval"]["save_confusion"] and distributed.is_main_process():
            csv_path, png_path = save_confusion(workdir, counts, names)
            log(f"wrote the confusion matrix to {csv_path} and {png_path}")
    if counts.sum() == 0:
        log(
            f"warning: {config['dataset']['eval_set']!r} has no labelled pixels, so no metrics (a "
            "test split? score it with --config.eval.format_only=True, or evaluate "
            "--config.dataset.eval_set=val)"
        )
    clean = to_json(as_percent(metrics))  # percent, as the table above and the reference's logs
    return {
        "num_images": num_images,
        "seconds": round(seconds, 1),
        "mIoU": clean["mIoU"],
        "aAcc": clean["aAcc"],
        "mAcc": clean["mAcc"],
        "IoU": dict(zip(names, clean["IoU"])),
        "Acc": dict(zip(names, clean["Acc"])),
    }


def _scalar(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _draw_curves(workdir: Path, log: Log) -> None:
    """Redraws WORKDIR/curves.png from metrics.jsonl (process 0); a failure is only reported."""
    if not distributed.is_main_process():
        return
    try:
        write_curves(workdir)
    except Exception as error:  # a picture is never worth stopping a run for
        log(f"warning: could not draw {workdir / CURVES}: {type(error).__name__}: {error}")


class EpochEvaluation:
    """Evaluations of the exported variables during training: :meth:`after_epoch` (the loop's
    hook) every ``train.eval_every`` epochs before the last one; the run evaluates after the
    last one itself, in detail, once the training bar is gone. Each records ``eval/*`` scalars
    and offers the variables to the best checkpoint, DIR/checkpoints/best."""

    def __init__(
        self,
        model: Any,
        data: ExperimentData,
        config: Mapping[str, Any],
        workdir: Path,
        log: Log,
        writer: Any,
    ):
        self.model, self.data, self.config = model, data, config
        self.workdir, self.log, self.writer = workdir, log, writer
        self.every = max(0, int(config["train"]["eval_every"]))
        self.num_epochs = int(config["train"]["num_epochs"])
        self.best = BestCheckpoint(workdir / "checkpoints" / BEST)

    def due(self, epoch: int) -> bool:
        return self.every > 0 and epoch % self.every == 0 and epoch < self.num_epochs

    def after_epoch(self, epoch: int, state: Any) -> None:
        if self.due(epoch):
            self.evaluate(state.export_variables, int(state.step), epoch)

    def evaluate(
        self, variables: Mapping[str, Any], step: int, epoch: int, *, detailed: bool = False
    ) -> dict[str, Any]:
        result = evaluate_variables(
            self.model, variables, self.data, self.config, self.workdir, self.log, detailed=detailed
        )
        scores = {k: _scalar(result[k]) for k in ("mIoU", "aAcc", "mAcc")}
        self.writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
        _draw_curves(self.workdir, self.log)
        improved = self.best.offer(variables, result, step=step, epoch=epoch)
        best = self.best.record or {}
        self.log(
            f"epoch {epoch} evaluation: mIoU {scores['mIoU']:.2f} aAcc {scores['aAcc']:.2f} "
            f"mAcc {scores['mAcc']:.2f} ({result['seconds']:.1f}s)"
            + (
                f"; new best, saved to {self.best.directory}"
                if improved
                else f"; best {best['mIoU']:.2f} at epoch {best['epoch']}"
                if best
                else ""
            )
        )
        return result


# ============================================================================================
# Training


def _train(
    model: Any,
    data: ExperimentData,
    config: Mapping[str, Any],
    workdir: Path,
    log: Log,
    *,
    periodic: bool,
    final: bool,
    handle_signals: bool,
) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """Trains in ``workdir`` (resuming from DIR/train_state) and exports the variables; returns
    them, their results.json entries, and the evaluation after the last epoch (or None).

    ``periodic``: evaluate every ``train.eval_every`` epochs, and after the last one when this
    run trained it. ``final``: evaluate after the last epoch in any case (train_and_eval)."""
    check_train_config(config)
    main_process = distributed.is_main_process()

    def write_config() -> None:  # once the state is resumed: a refused resume leaves it alone
        if main_process:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    mesh = data_mesh()
    training = data.training(mesh)
    num_epochs = int(config["train"]["num_epochs"])
    checkpoints = TrainCheckpoints(
        workdir / "train_state", keep=int(config["train"]["keep_checkpoints"])
    )
    total_steps = num_epochs * training.steps_per_epoch
    resumed_from = checkpoints.latest_step() or 0
    earlier: list[dict[str, Any]] = []  # what earlier launches of this run logged, to the resume
    if main_process:
        redo = resumed_from >= total_steps and final  # the final evaluation is done again
        earlier = [
            r for r in rewind_records(workdir, resumed_from, redo_evaluation=redo) if "loss" in r
        ]
    writer = MetricWriter(workdir) if main_process else NullWriter()
    writer.write_hparams(config)
    bar = ProgressBar(total_steps, "training", enabled=None if main_process else False)
    train_log = bar.interleave(log)

    evaluation = (
        EpochEvaluation(model, data, config, workdir, train_log, writer)
        if periodic or final
        else None
    )
    stop = (
        StopRequests(abort=_abort, check_every=int(config["train"]["log_every"]))
        if handle_signals
        else None
    )
    final_result = None
    started = time.perf_counter()
    try:
        with stop or contextlib.nullcontext():  # a signal in the final evaluation only asks to stop
            with bar:
                state, history = train(
                    model,
                    config,
                    training,
                    mesh,
                    log=train_log,
                    checkpoints=checkpoints,
                    record=writer.write_scalars,
                    initial_variables=initial_variables(config, train_log),
                    after_epoch=evaluation.after_epoch if periodic else None,
                    progress=bar,
                    stop=stop,
                    on_start=write_config,
                )
            variables, step = state.export_variables, int(state.step)
            if final or (periodic and step > resumed_from):  # the last epoch ended in this run
                final_result = evaluation.evaluate(variables, step, num_epochs, detailed=True)
        seconds = time.perf_counter() - started
    finally:
        checkpoints.close()
        writer.close()
    _draw_curves(workdir, log)

    checkpoint = save_variables(new_checkpoint_dir(workdir, step), variables)
    ema = state.ema_params is not None
    if ema:
        log(
            f"using the EMA weights (train.ema_decay={config['train']['ema_decay']}) for the "
            "checkpoint and the evaluation"
        )
    log(f"saved the {'EMA ' if ema else ''}variables to {checkpoint}")
    history = earlier + history  # results.json describes the whole run, from step 1
    entries: dict[str, Any] = {
        "train": {
            "steps": step,
            "seconds": round(seconds, 1),
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "history": history,
        },
        "checkpoint": str(checkpoint),
    }
    if ema:
        entries["ema_decay"] = float(config["train"]["ema_decay"])
    if evaluation is not None and evaluation.best.record is not None:
        entries["best"] = {**evaluation.best.record, "checkpoint": str(evaluation.best.directory)}
    return variables, entries, final_result


def _write_submission(
    model: Any,
    variables: Any,
    data: ExperimentData,
    config: Mapping[str, Any],
    workdir: Path,
    log: Log,
) -> dict[str, Any]:
    """Writes the predictions of ``dataset.eval_set`` for the dataset's evaluation server; returns
    the ``submission`` section of results.json."""

    items, num_images = data.submission()
    name = config["dataset"]["name"]
    directory = workdir / "submission" / name
    started = time.perf_counter()
    written = write_submission(
        model, variables, items, name, directory, log=log, **evaluation_options(config)
    )
    split = str(config["dataset"]["eval_set"])
    log(
        f"wrote {len(written)} predictions of {num_images} {split} images to {directory} "
        f"({time.perf_counter() - started:.1f}s); no metrics (eval.format_only)"
    )
    return {"directory": str(directory), "num_images": len(written), "split": split}


def _write_results(workdir: Path, update: dict[str, Any], merge: bool) -> Path:
    """Writes DIR/results.json; ``merge`` keeps what an earlier run wrote (an eval after
    training)."""
    path = workdir / "results.json"
    results = json.loads(path.read_text()) if merge and path.exists() else {}
    results.update(update)
    path.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    return path


# ============================================================================================
# The experiment


def run(
    config: Any,
    workdir: str | os.PathLike,
    mode: str = "train_and_eval",
    log: Log = _log,
    handle_signals: bool = False,
) -> dict[str, Any]:
    """Runs ``mode`` for ``config`` in ``workdir`` and returns what went into results.json.

    ``handle_signals``: during training, SIGINT / SIGTERM save a checkpoint at the next step
    (every host the same) and raise :class:`TrainingInterrupted` (see
    :mod:`mcibi_jax.train.interrupt`); a second signal ends the process at once."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    check_dataset_config(config)
    evaluation_options(config)  # bad inference settings fail before any training
    workdir = _work_folder(workdir)
    model = build_model(config["model"], dtype=model_dtype(config["dtype"]))
    data = experiment_data(config)
    update: dict[str, Any] = {"name": config["name"], "dataset": config["dataset"]["name"]}

    format_only = mode != "train" and bool(config["eval"]["format_only"])
    final_result = None
    if mode == "eval":
        checkpoint = checkpoint_to_evaluate(workdir, str(config["eval"]["checkpoint"]))
        log(f"evaluating {checkpoint}")
        variables = load_variables(checkpoint, config)
        update["checkpoint"] = str(checkpoint)
    else:
        periodic = not format_only and int(config["train"]["eval_every"]) > 0
        final = mode == "train_and_eval" and not format_only
        variables, entries, final_result = _train(
            model,
            data,
            config,
            workdir,
            log,
            periodic=periodic,
            final=final,
            handle_signals=handle_signals,
        )
        update.update(entries)

    if format_only:
        update["submission"] = _write_submission(model, variables, data, config, workdir, log)
    elif mode == "eval":
        update["eval"] = evaluate_variables(model, variables, data, config, workdir, log)
    elif mode == "train_and_eval":
        update["eval"] = final_result
    if distributed.is_main_process():
        log(f"wrote {_write_results(workdir, update, merge=mode == 'eval')}")
    return update


def _work_folder(workdir: str | os.PathLike) -> Path:
    """``workdir`` as an absolute path, created; a clear error where it cannot be a folder."""
    workdir = Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir={workdir} is a file; give a folder (new or of this run)")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise ConfigError(
            f"--workdir={workdir}: cannot write there ({error.strerror or error}); give a folder "
            "this process can write"
        ) from None
    return workdir


# ============================================================================================
# The program: python -m mcibi_jax.main


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
        print(
            f"stopped by {stopped.signal_name} at step {stopped.step}/{stopped.total_steps}; "
            f"{where}. Resume with the same command{hosts}: {_resume_command()}",
            file=sys.stderr,
            flush=True,
        )
    name = stopped.signal_name
    number = getattr(signal.Signals, name, None) if name.startswith("SIG") else None
    return 128 + int(number or signal.SIGTERM)


def _fail(message: str, shown: bool = False, code: int = 1) -> None:
    """Reports a failure once and exits; in a multi-process run every process stops."""
    if jax.process_count() > 1:
        distributed.fail_all(message, shown=shown, code=code)
    if not shown:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(config: Any, workdir: str, mode: str) -> None:
    """The program ``python -m mcibi_jax.main``: :func:`run` on every process of the run, with
    signals saving a checkpoint; a user's mistake ends every process with one ``error:`` line
    (exit status 1), an interrupted training with 128 + the signal's number."""

    # Our progress lines go to stdout; keep the libraries' (orbax's) INFO chatter out of them.
    if absl_logging.get_verbosity() == absl_logging.INFO:
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        distributed.initialize()
        distributed.watch_peers()  # another process's failure ends this one too
        log = _log if distributed.is_main_process() else (lambda message: None)
        run(config, workdir, mode, log=log, handle_signals=True)
    except (
        ConfigError,
        DatasetUnavailable,
        TrainingDiverged,
        NotImplementedError,
        FileNotFoundError,
        FileExistsError,
        PortError,
        PthError,
        distributed.DistributedConfigError,
    ) as error:
        _fail(str(error))
    except OSError as error:  # a full disk, a read-only folder: name the file, no traceback
        _fail(f"{error.strerror or type(error).__name__}: {error.filename or error}")
    except TrainingInterrupted as stopped:
        raise SystemExit(_interrupted(stopped)) from None
    except KeyboardInterrupt:  # outside training (which saves first)
        _fail(f"interrupted on process {jax.process_index()}", code=130)
    except Exception as error:
        if jax.process_count() == 1:
            raise
        traceback.print_exc()
        _fail(f"{type(error).__name__}: {error}", shown=True)
