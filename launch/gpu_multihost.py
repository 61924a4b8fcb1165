"""Start mcibi_jax training on several GPU hosts over ssh, one process per host (or per GPU).

    python launch/gpu_multihost.py --hosts=gpu1,gpu2 --repo_dir=/shared/mcibi_jax \\
        --config=configs/cityscapes.py:r50 --workdir=/shared/runs/r50 -- --config.dataset.root=/data/cityscapes
    python launch/gpu_multihost.py --hostfile=hosts.txt ... --dry_run      # print the commands
    # inside a SLURM allocation (salloc/sbatch) the hosts come from SLURM_JOB_NODELIST:
    python launch/gpu_multihost.py --config=... --workdir=...

Process ``i`` gets ``MCIBI_COORDINATOR=<first host>:<port>``, ``MCIBI_NUM_PROCESSES`` and
``MCIBI_PROCESS_ID=i`` (and ``MCIBI_LOCAL_DEVICE_IDS`` with ``--procs_per_host`` > 1), which
``mcibi_jax.distributed.initialize()`` reads. The repository and Python environment must already
be at ``--repo_dir`` on every host (a shared file system, or a copy). Each process writes
``<log_dir>/<run_name>.<i>.log`` on its host; this launcher waits for all of them and stops the
others as soon as one fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_PORT = 12355


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list -> host names: ``"gpu[01-03,07],login"`` -> gpu01, gpu02, gpu03, gpu07, login."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not last:
                hosts.append(prefix + first)
                continue
            width = len(first)
            hosts.extend(f"{prefix}{n:0{width}d}" for n in range(int(first), int(last) + 1))
    return hosts


def resolve_hosts(args: argparse.Namespace, environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    if args.hosts:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    elif args.hostfile:
        lines = Path(args.hostfile).read_text().splitlines()
        hosts = [line.split("#", 1)[0].strip() for line in lines]
        hosts = [h for h in hosts if h]
    elif env.get("SLURM_JOB_NODELIST"):
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    else:
        raise ValueError(
            "no hosts: pass --hosts=a,b,... or --hostfile=FILE, or run inside a SLURM allocation"
        )
    if not hosts:
        raise ValueError("the host list is empty")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"duplicate hosts in {hosts}")
    return hosts


def process_env(
    hosts: list[str], host_index: int, local_index: int, args: argparse.Namespace
) -> dict[str, str]:
    """The MCIBI_* variables of process (host_index, local_index)."""
    env = {
        "MCIBI_COORDINATOR": f"{args.coordinator or hosts[0]}:{args.port}",
        "MCIBI_NUM_PROCESSES": str(len(hosts) * args.procs_per_host),
        "MCIBI_PROCESS_ID": str(host_index * args.procs_per_host + local_index),
    }
    if args.procs_per_host > 1:
        env["MCIBI_LOCAL_DEVICE_IDS"] = str(local_index)
    return env


def remote_script(env: dict[str, str], args: argparse.Namespace) -> str:
    """The shell line one process runs on its host (in the foreground, output to its log)."""
    variables = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**dict(args.env), **env}.items())
    main = shlex.join(
        [
            args.python,
            "-m",
            "mcibi_jax.main",
            f"--config={args.config}",
            f"--workdir={args.workdir}",
            f"--mode={args.mode}",
            *args.main_args,
        ]
    )
    log = f"{args.log_dir}/{args.run_name}.{env['MCIBI_PROCESS_ID']}.log"
    return f"mkdir -p {args.log_dir} && cd {args.repo_dir} && {variables} exec {main} > {log} 2>&1 < /dev/null"


def build_commands(args: argparse.Namespace, hosts: list[str]) -> list[tuple[str, list[str]]]:
    """[(host, ssh command)] for every process, process 0 first."""
    ssh = shlex.split(args.ssh)
    commands = []
    for host_index, host in enumerate(hosts):
        for local_index in range(args.procs_per_host):
            env = process_env(hosts, host_index, local_index, args)
            commands.append((host, [*ssh, host, remote_script(env, args)]))
    return commands


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_multihost.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--hosts", help="comma-separated host names; the first runs the coordinator (process 0)"
    )
    where.add_argument("--hostfile", help="one host per line (# comments allowed)")
    parser.add_argument("--config", required=True, help="e.g. configs/cityscapes.py:r50")
    parser.add_argument(
        "--workdir",
        required=True,
        help="on the hosts (a shared file system, the same path everywhere)",
    )
    parser.add_argument(
        "--mode", default="train_and_eval", choices=["train", "eval", "train_and_eval"]
    )
    parser.add_argument(
        "--repo_dir",
        default=os.getcwd(),
        help="the checkout on the hosts (default: this directory)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Python with mcibi_jax installed, on the hosts (default: this interpreter's path)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="coordinator port on the first host"
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        help="coordinator address if the first host's name is not "
        "reachable from the others (e.g. its IP)",
    )
    parser.add_argument(
        "--procs_per_host",
        type=int,
        default=1,
        help="1: one process sees all GPUs of its host; "
        "K: K processes per host, process j using GPU j",
    )
    parser.add_argument(
        "--log_dir", default="/tmp/mcibi_logs", help="per-process logs, on each host"
    )
    parser.add_argument("--run_name", default="mcibi")
    parser.add_argument(
        "--ssh", default="ssh -o BatchMode=yes", help="ssh command (add -p, -i, ... here)"
    )
    parser.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more environment variables for every process (repeatable)",
    )
    parser.add_argument(
        "--dry_run", "--dry-run", action="store_true", help="print the commands, run nothing"
    )
    parser.add_argument("main_args", nargs="*", help="after --: more arguments of mcibi_jax.main")
    return parser


def _run_all(commands: list[tuple[str, list[str]]]) -> int:
    procs = []
    try:
        for host, command in commands:
            print(f"+ {shlex.join(command)}", flush=True)
            procs.append((host, subprocess.Popen(command)))
        while True:
            codes = [p.poll() for _, p in procs]
            failed = [(h, c) for (h, _), c in zip(procs, codes) if c]
            if failed:
                host, code = failed[0]
                print(
                    f"error: the process on {host} exited with status {code}; stopping the others",
                    file=sys.stderr,
                )
                return code
            if all(c == 0 for c in codes):
                print(f"all {len(procs)} processes finished")
                return 0
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("interrupted; stopping the processes", file=sys.stderr)
        return 130
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                # Ends the ssh session. The remote process gets SIGHUP only with a terminal
                # (--ssh='ssh -tt'); otherwise JAX's coordination heartbeat ends it once a peer is gone.
                proc.terminate()
        for _, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.procs_per_host < 1:
        parser.error("--procs_per_host must be at least 1")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    try:
        hosts = resolve_hosts(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    commands = build_commands(args, hosts)
    if args.dry_run:
        for _, command in commands:
            print(shlex.join(command))
        return 0
    return _run_all(commands)


if __name__ == "__main__":
    sys.exit(main())
