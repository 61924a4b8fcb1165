"""launch/tpu_pod.py and launch/gpu_multihost.py: dry-run commands, argument errors, and the
generated shell scripts run locally against stand-ins for python and ssh."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, load_script

tpu_pod = load_script("launch", "tpu_pod")
gpu_multihost = load_script("launch", "gpu_multihost")

TPU = ["--name=pod1", "--zone=us-central2-b", "--project=proj", "--dry_run"]


def _dry(module, argv: list[str], capsys) -> list[list[str]]:
    assert module.main(argv) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def _option(command: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --- tpu_pod.py ---------------------------------------------------------------------------


def test_tpu_create(capsys):
    [command] = _dry(
        tpu_pod,
        [*TPU, "create", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"],
        capsys,
    )
    assert command == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "pod1",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--zone=us-central2-b",
        "--project=proj",
        "--spot",
    ]
    # the underscore spelling too; no --project when not given
    [command] = _dry(
        tpu_pod,
        [
            "--name=p",
            "--zone=z",
            "--dry_run",
            "create",
            "--accelerator_type=v5litepod-8",
            "--version=v",
        ],
        capsys,
    )
    assert "--accelerator-type=v5litepod-8" in command and not any(
        a.startswith("--project") for a in command
    )


def test_tpu_ssh_stop_delete(capsys):
    [ssh] = _dry(tpu_pod, [*TPU, "ssh"], capsys)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1"] and "--worker=0" in ssh
    [ssh] = _dry(
        tpu_pod, [*TPU, "ssh", "--worker=all", "--command=tail -n 5 ~/mcibi_logs/*.log"], capsys
    )
    assert "--worker=all" in ssh and _option(ssh, "command") == "tail -n 5 ~/mcibi_logs/*.log"
    [stop] = _dry(tpu_pod, [*TPU, "stop", "--run_name=r50"], capsys)
    assert "--worker=all" in stop and "ssh" in stop
    assert "kill -TERM -- -$(cat ~/mcibi_logs/r50.pid)" in _option(stop, "command")
    [delete] = _dry(tpu_pod, [*TPU, "delete"], capsys)
    assert delete == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "pod1",
        "--quiet",
        "--zone=us-central2-b",
        "--project=proj",
    ]


def test_tpu_run(capsys):
    pack, copy, install, start = _dry(
        tpu_pod,
        [
            *TPU,
            "run",
            "--config=configs/cityscapes.py:r50",
            "--workdir=/data/runs/r50",
            "--env=XLA_FLAGS=--xla_dump_to=/tmp/x",
            "--",
            "--config.train.batch_size=32",
            "--config.dataset.root=/data/city",
        ],
        capsys,
    )
    assert pack[0] == "tar" and "--exclude=.git" in pack and pack[-3:] == ["-C", str(REPO), "."]
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
    assert "pod1:mcibi_jax_src.tar.gz" in copy and "--project=proj" in copy
    assert "--worker=all" in install
    script = _option(install, "command")
    assert (
        "tar -xzf ~/mcibi_jax_src.tar.gz -C ~/mcibi_jax" in script
        and "-m venv ~/mcibi_venv" in script
    )
    assert "pip install -q -e . 'jax[tpu]>=0.10.2,<0.11'" in script
    assert "--worker=all" in start
    script = _option(start, "command")
    assert (
        "~/mcibi_venv/bin/python -m mcibi_jax.main --config=configs/cityscapes.py:r50 --workdir=/data/runs/r50 "
        "--mode=train_and_eval --config.train.batch_size=32 --config.dataset.root=/data/city"
    ) in script
    assert "XLA_FLAGS=--xla_dump_to=/tmp/x setsid nohup" in script
    assert (
        "> ~/mcibi_logs/mcibi.$(hostname).log 2>&1" in script
        and "echo $! > ~/mcibi_logs/mcibi.pid" in script
    )
    # --no_install skips pip
    _, _, install, _ = _dry(
        tpu_pod, [*TPU, "run", "--config=c", "--workdir=/w", "--no_install"], capsys
    )
    assert "pip" not in _option(install, "command")


@pytest.mark.parametrize(
    "argv",
    [
        ["--zone=z", "delete"],  # no --name
        ["--name=n", "delete"],  # no --zone
        ["--name=n", "--zone=z"],  # no subcommand
        ["--name=n", "--zone=z", "create", "--version=v"],  # no --accelerator-type
        [
            "--name=n",
            "--zone=z",
            "create",
            "--accelerator-type=v4-8",
            "--version=v",
            "--spot",
            "--preemptible",
        ],
        ["--name=n", "--zone=z", "run", "--workdir=/w"],  # no --config
        ["--name=n", "--zone=z", "run", "--config=c", "--workdir=/w", "--env=NOEQUALS"],
        ["--name=n", "--zone=z", "reboot"],
    ],
)
def test_tpu_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tpu_pod.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_tpu_without_gcloud_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(tpu_pod.shutil, "which", lambda name: None)
    assert tpu_pod.main(["--name=n", "--zone=z", "delete"]) == 2
    err = capsys.readouterr().err
    assert "gcloud not found" in err and "--dry_run" in err and "Traceback" not in err


def test_tpu_start_and_stop_scripts_run(tmp_path, capsys):
    """The remote start/stop scripts, run here with bash: a stand-in python that sleeps."""
    venv, repo, logs = tmp_path / "venv", tmp_path / "repo", tmp_path / "logs"
    (venv / "bin").mkdir(parents=True)
    repo.mkdir()
    _executable(
        venv / "bin" / "python", '#!/bin/sh\necho "args: $*"; echo "FOO=$FOO"; exec sleep 30\n'
    )
    common = [f"--log_dir={logs}", "--run_name=t"]
    *_, start = _dry(
        tpu_pod,
        [
            *TPU,
            "run",
            "--config=c.py:x",
            "--workdir=/w",
            f"--venv={venv}",
            f"--repo_dir={repo}",
            "--env=FOO=bar baz",
            "--no_install",
            *common,
        ],
        capsys,
    )
    [stop] = _dry(tpu_pod, [*TPU, "stop", *common], capsys)
    subprocess.run(
        ["bash", "-c", _option(start, "command")], check=True, timeout=20, capture_output=True
    )
    pid = int((logs / "t.pid").read_text())
    try:
        [log] = logs.glob("t.*.log")
        for _ in range(100):
            if "FOO=" in log.read_text():
                break
            time.sleep(0.05)
        assert (
            "args: -m mcibi_jax.main --config=c.py:x --workdir=/w --mode=train_and_eval"
            in log.read_text()
        )
        assert "FOO=bar baz" in log.read_text()
        os.kill(pid, 0)  # running
        out = subprocess.run(
            ["bash", "-c", _option(stop, "command")],
            check=True,
            timeout=20,
            capture_output=True,
            text=True,
        ).stdout
        assert "stopped" in out and not (logs / "t.pid").exists()
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            else:
                time.sleep(0.05)
                try:  # reap it if it is our child's child re-parented to us (it is not, normally)
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        else:
            pytest.fail("the stop script left the process running")
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- gpu_multihost.py ---------------------------------------------------------------------


GPU = [
    "--config=configs/cityscapes.py:r50",
    "--workdir=/shared/runs/r50",
    "--repo_dir=/shared/mcibi_jax",
    "--python=/shared/venv/bin/python",
    "--dry_run",
]


def _env_of(script: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(script) if word.startswith("MCIBI_"))


def test_gpu_hosts(capsys):
    commands = _dry(
        gpu_multihost,
        [*GPU, "--hosts=gpu1,gpu2,gpu3", "--port=23456", "--", "--config.train.batch_size=24"],
        capsys,
    )
    assert [c[:4] for c in commands] == [
        ["ssh", "-o", "BatchMode=yes", h] for h in ("gpu1", "gpu2", "gpu3")
    ]
    for i, command in enumerate(commands):
        script = command[4]
        assert _env_of(script) == {
            "MCIBI_COORDINATOR": "gpu1:23456",
            "MCIBI_NUM_PROCESSES": "3",
            "MCIBI_PROCESS_ID": str(i),
        }
        assert script.startswith("mkdir -p /tmp/mcibi_logs && cd /shared/mcibi_jax && ")
        assert (
            "exec /shared/venv/bin/python -m mcibi_jax.main --config=configs/cityscapes.py:r50 "
            "--workdir=/shared/runs/r50 --mode=train_and_eval --config.train.batch_size=24 "
            f"> /tmp/mcibi_logs/mcibi.{i}.log 2>&1"
        ) in script


def test_gpu_hostfile_procs_per_host_and_options(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the nodes\nnodeA\n\nnodeB  # second\n")
    commands = _dry(
        gpu_multihost,
        [
            *GPU,
            f"--hostfile={hostfile}",
            "--procs_per_host=2",
            "--coordinator=10.0.0.5",
            "--ssh=ssh -p 2222",
            "--env=NCCL_DEBUG=INFO",
        ],
        capsys,
    )
    assert [c[:4] for c in commands] == [
        ["ssh", "-p", "2222", h] for h in ("nodeA", "nodeA", "nodeB", "nodeB")
    ]
    envs = [_env_of(c[4]) for c in commands]
    assert [e["MCIBI_PROCESS_ID"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["MCIBI_LOCAL_DEVICE_IDS"] for e in envs] == ["0", "1", "0", "1"]
    assert {e["MCIBI_COORDINATOR"] for e in envs} == {"10.0.0.5:12355"} and {
        e["MCIBI_NUM_PROCESSES"] for e in envs
    } == {"4"}
    assert all("NCCL_DEBUG=INFO " in c[4] for c in commands)


def test_gpu_hosts_from_slurm(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "dgx[01-02,10],login")
    commands = _dry(gpu_multihost, GPU, capsys)
    assert [c[3] for c in commands] == ["dgx01", "dgx02", "dgx10", "login"]
    assert _env_of(commands[3][4])["MCIBI_COORDINATOR"] == "dgx01:12355"
    assert gpu_multihost.expand_nodelist("a[8-11]") == ["a8", "a9", "a10", "a11"]
    assert gpu_multihost.expand_nodelist("n1,n2") == ["n1", "n2"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--workdir=/w", "--hosts=a"],  # no --config
        ["--config=c", "--workdir=/w"],  # no hosts, no SLURM
        ["--config=c", "--workdir=/w", "--hosts=a", "--hostfile=f"],
        ["--config=c", "--workdir=/w", "--hosts=a,a"],
        ["--config=c", "--workdir=/w", "--hosts=a", "--procs_per_host=0"],
        ["--config=c", "--workdir=/w", "--hosts=a", "--port=70000"],
        ["--config=c", "--workdir=/w", "--hostfile=/nonexistent/hosts"],
    ],
)
def test_gpu_argument_errors(argv, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_multihost.main([*argv, "--dry_run"])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_gpu_launch_runs_every_process(tmp_path, capsys):
    """A real launch with stand-ins: 'ssh' runs the script here, 'python' prints its MCIBI_* settings."""
    fake_ssh = _executable(tmp_path / "ssh", '#!/bin/sh\n# $1: host, $2: script\nexec sh -c "$2"\n')
    fake_python = _executable(
        tmp_path / "python",
        "#!/bin/sh\nenv | grep ^MCIBI_ | sort\n"
        '[ "$MCIBI_PROCESS_ID" = "$FAIL_ID" ] && exit 3\nexit 0\n',
    )
    argv = [
        "--config=c",
        "--workdir=/w",
        f"--repo_dir={tmp_path}",
        f"--python={fake_python}",
        f"--ssh={fake_ssh}",
        f"--log_dir={tmp_path / 'logs'}",
        "--hosts=h0,h1",
    ]
    assert gpu_multihost.main(argv) == 0
    for i in range(2):
        log = (tmp_path / "logs" / f"mcibi.{i}.log").read_text()
        assert (
            f"MCIBI_PROCESS_ID={i}" in log
            and "MCIBI_NUM_PROCESSES=2" in log
            and "MCIBI_COORDINATOR=h0:12355" in log
        )
    assert gpu_multihost.main([*argv, "--env=FAIL_ID=1"]) == 3
    assert "exited with status 3" in capsys.readouterr().err
