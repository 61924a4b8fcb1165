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

What runs where: :mod:`mcibi_jax.train.experiment` and docs/architecture.md.
"""

from __future__ import annotations

from absl import app, flags

from mcibi_jax import compilation_cache
from mcibi_jax.command_line import CommandLine, usage_error
from mcibi_jax.train import experiment

# The command line, set up only when this module runs as the program: absl.app.run parses the
# global absl.flags.FLAGS (with absl's logging flags) through it.
_COMMAND: CommandLine | None = None
_WORKDIR = _MODE = None


def _define_flags() -> tuple[CommandLine, flags.FlagHolder, flags.FlagHolder]:
    command = CommandLine(
        "python -m mcibi_jax.main",
        __doc__,
        config="config file, e.g. configs/demo.py or configs/cityscapes.py:r50; "
        "then --config.<key>=<value> to change single values",
        flag_values=flags.FLAGS,
    )
    workdir = flags.DEFINE_string("workdir", None, "directory for checkpoints and results")
    mode = flags.DEFINE_enum("mode", "train_and_eval", experiment.MODES, "what to run")
    flags.mark_flags_as_required(["workdir"])
    return command, workdir, mode


def _parse_command_line(argv: list[str]) -> list[str]:
    """absl.app.run's ``flags_parser``: ``argv`` includes the program name, and so does the result."""
    return [argv[0], *_COMMAND.parse(argv[1:])]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage_error(f"unexpected arguments {argv[1:]}")
    compilation_cache.enable()
    experiment.main(_COMMAND.config, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
    _COMMAND, _WORKDIR, _MODE = _define_flags()
    app.run(main, flags_parser=_parse_command_line)
