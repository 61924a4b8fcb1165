"""Train mcibi_jax on a Cloud TPU VM (single host or pod slice) through ``gcloud``.

    python launch/tpu_pod.py --name=mcibi --zone=us-central2-b create --accelerator-type=v4-32 --version=tpu-ubuntu2204-base
    python launch/tpu_pod.py --name=mcibi --zone=us-central2-b run --config=configs/cityscapes.py:r50 \\
        --workdir=/home/$USER/runs/r50 -- --config.dataset.root=/data/cityscapes
    python launch/tpu_pod.py --name=mcibi --zone=us-central2-b ssh --worker=0 --command='tail -f ~/mcibi_logs/*.log'
    python launch/tpu_pod.py --name=mcibi --zone=us-central2-b stop
    python launch/tpu_pod.py --name=mcibi --zone=us-central2-b delete

``run`` packs this checkout (without .git), copies it to every worker, installs it there with
``jax[tpu]``, and starts ``python -m mcibi_jax.main`` on all workers at once in the background;
each worker writes its log to ``<log_dir>/<run_name>.<hostname>.log`` and its process id to
``<log_dir>/<run_name>.pid`` (``stop`` kills that process group). JAX finds the other workers
itself on Cloud TPU (``mcibi_jax.distributed.initialize()`` with nothing set).
``--dry_run`` prints every command instead of running it.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JAX_TPU_REQUIREMENT = "jax[tpu]>=0.10.2,<0.11"  # the pyproject's jax range, with libtpu
TARBALL = "mcibi_jax_src.tar.gz"
PACK_EXCLUDES = (".git", "__pycache__", "*.egg-info", ".pytest_cache", "*.pyc")


def _gcloud(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
    command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    if args.project:
        command.append(f"--project={args.project}")
    return command


def _remote(args: argparse.Namespace, script: str, worker: str = "all") -> list[str]:
    """``gcloud ... ssh NAME --worker=W --command=SCRIPT``."""
    return _gcloud(args, "ssh", args.name, f"--worker={worker}", f"--command={script}")


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    command = _gcloud(
        args,
        "create",
        args.name,
        f"--accelerator-type={args.accelerator_type}",
        f"--version={args.version}",
    )
    if args.spot:
        command.append("--spot")
    if args.preemptible:
        command.append("--preemptible")
    return [command]


def ssh_commands(args: argparse.Namespace) -> list[list[str]]:
    command = _gcloud(args, "ssh", args.name, f"--worker={args.worker}")
    if args.command:
        command.append(f"--command={args.command}")
    return [command]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    return [_gcloud(args, "delete", args.name, "--quiet")]


def _pid_file(args: argparse.Namespace) -> str:
    return f"{args.log_dir}/{args.run_name}.pid"


def stop_commands(args: argparse.Namespace) -> list[list[str]]:
    pid = _pid_file(args)
    # The run was started with setsid: its pid is its process group (the data workers included).
    script = (
        f'if [ -f {pid} ]; then kill -TERM -- -$(cat {pid}) 2>/dev/null && echo "$(hostname): stopped" '
        f'|| echo "$(hostname): not running"; rm -f {pid}; else echo "$(hostname): no {pid}"; fi'
    )
    return [_remote(args, script)]


def train_command(args: argparse.Namespace) -> str:
    """The shell line that starts training in the background on one worker."""
    env = " ".join(f"{shlex.quote(k)}={shlex.quote(v)}" for k, v in args.env)
    # The venv path stays unquoted so that the workers' shell expands its "~".
    main = f"{args.venv}/bin/python " + shlex.join(
        [
            "-m",
            "mcibi_jax.main",
            f"--config={args.config}",
            f"--workdir={args.workdir}",
            f"--mode={args.mode}",
            *args.main_args,
        ]
    )
    log = f"{args.log_dir}/{args.run_name}.$(hostname).log"
    # "|| exit 1;" ends the list, so that "&" puts only the training command in the background
    # and $! is its pid (setsid runs it in a new process group with that id).
    return (
        f"mkdir -p {args.log_dir} && cd {args.repo_dir} || exit 1; "
        f"{env + ' ' if env else ''}setsid nohup {main} > {log} 2>&1 < /dev/null & echo $! > {_pid_file(args)}; "
        f'echo "$(hostname): started, log {log}"'
    )


def run_commands(args: argparse.Namespace) -> list[list[str]]:
    local_tarball = f"{args.tmp_dir}/{TARBALL}"
    excludes = [f"--exclude={pattern}" for pattern in PACK_EXCLUDES]
    commands = [["tar", *excludes, "-czf", local_tarball, "-C", str(REPO), "."]]
    commands.append(_gcloud(args, "scp", local_tarball, f"{args.name}:{TARBALL}", "--worker=all"))
    unpack = f"rm -rf {args.repo_dir} && mkdir -p {args.repo_dir} && tar -xzf ~/{TARBALL} -C {args.repo_dir}"
    if args.install:
        # A virtual environment: recent TPU images refuse pip installs into the system Python.
        pip = f"{args.venv}/bin/python -m pip install -q"
        unpack += (
            f" && {{ [ -x {args.venv}/bin/python ] || {args.python} -m venv {args.venv}; }}"
            f" && {pip} -U pip && cd {args.repo_dir} && {pip} -e . {shlex.quote(JAX_TPU_REQUIREMENT)}"
        )
    commands.append(_remote(args, unpack))
    commands.append(_remote(args, train_command(args)))
    return commands


COMMANDS = {
    "create": create_commands,
    "ssh": ssh_commands,
    "run": run_commands,
    "stop": stop_commands,
    "delete": delete_commands,
}


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpu_pod.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument(
        "--project", default=None, help="GCP project (default: gcloud's configured project)"
    )
    parser.add_argument(
        "--dry_run", "--dry-run", action="store_true", help="print the commands, run nothing"
    )
    sub = parser.add_subparsers(
        dest="subcommand", required=True, metavar="{create,ssh,run,stop,delete}"
    )

    create = sub.add_parser("create", help="create the TPU VM")
    create.add_argument(
        "--accelerator_type",
        "--accelerator-type",
        required=True,
        help="e.g. v4-8, v4-32, v5litepod-16",
    )
    create.add_argument(
        "--version", required=True, help="TPU software version, e.g. tpu-ubuntu2204-base"
    )
    kind = create.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true")
    kind.add_argument("--preemptible", action="store_true")

    ssh = sub.add_parser("ssh", help="open a shell on a worker, or run --command there")
    ssh.add_argument("--worker", default="0", help="worker index or 'all' (default 0)")
    ssh.add_argument("--command", default=None)

    for name, helptext in (
        ("run", "copy/install this checkout on all workers and start training"),
        ("stop", "stop the training started by run, on all workers"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--log_dir",
            default="~/mcibi_logs",
            help="per-worker logs and the pid file (on the workers)",
        )
        p.add_argument("--run_name", default="mcibi", help="names the log and pid files")
        if name == "run":
            p.add_argument("--config", required=True, help="e.g. configs/cityscapes.py:r50")
            p.add_argument(
                "--workdir",
                required=True,
                help="absolute path on the workers (the same on every worker)",
            )
            p.add_argument(
                "--mode", default="train_and_eval", choices=["train", "eval", "train_and_eval"]
            )
            p.add_argument(
                "--repo_dir", default="~/mcibi_jax", help="where the checkout goes on the workers"
            )
            p.add_argument(
                "--python",
                default="python3",
                help="the workers' Python (3.11 or newer) that creates --venv",
            )
            p.add_argument(
                "--venv",
                default="~/mcibi_venv",
                help="virtual environment on the workers, created by the install",
            )
            p.add_argument(
                "--no_install",
                dest="install",
                action="store_false",
                help="skip pip install (already done)",
            )
            p.add_argument(
                "--env",
                type=_env_pair,
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="environment variable for the training processes (repeatable)",
            )
            p.add_argument(
                "--tmp_dir", default="/tmp", help="local directory for the packed checkout"
            )
            p.add_argument(
                "main_args",
                nargs="*",
                help="after --: more arguments of mcibi_jax.main, e.g. --config.train.batch_size=16",
            )

    sub.add_parser("delete", help="delete the TPU VM")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = COMMANDS[args.subcommand](args)
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    if shutil.which("gcloud") is None:
        print(
            "error: gcloud not found on PATH; install the Google Cloud SDK "
            "(https://cloud.google.com/sdk/docs/install) or pass --dry_run to see the commands",
            file=sys.stderr,
        )
        return 2
    for command in commands:
        print("+ " + shlex.join(command), flush=True)
        code = subprocess.run(command).returncode
        if code:
            print(f"error: the command above failed with exit status {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
