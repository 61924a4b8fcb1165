"""Multi-process (multi-host) start-up: one call before any other JAX work.

    from mcibi_jax import distributed
    distributed.initialize()          # flags or MCIBI_* env vars; no-op on one process
    if distributed.is_main_process():
        ...                           # write results, logs, checkpoints metadata

Settings, each from the argument or else its environment variable:

    coordinator_address  MCIBI_COORDINATOR       "host:port" of process 0 (it listens there)
    num_processes        MCIBI_NUM_PROCESSES     number of processes (usually one per host)
    process_id           MCIBI_PROCESS_ID        0 .. num_processes - 1
    local_device_ids     MCIBI_LOCAL_DEVICE_IDS  optional, e.g. "0,1,2,3": devices this process uses

The first three go together: all or none. With none, a managed cluster (Cloud TPU pod
slice, SLURM with more than one task, Open MPI) is left to ``jax.distributed.initialize()``'s
own detection; anywhere else nothing happens and JAX runs as a single process.

A failure on one process ends all of them: :func:`watch_peers` (after ``initialize``) stops this
process within a second when another reports one with :func:`fail_all`, rather than leaving it
waiting inside a collective for a peer that is gone; the error is shown once.

CPU processes (tests, debugging) exchange data through gloo collectives, which this JAX
version uses by default (``jax_cpu_collectives_implementation='gloo'``); ``initialize``
selects it explicitly when the CPU is the only platform.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax._src import distributed as jax_distributed

ENV_COORDINATOR = "MCIBI_COORDINATOR"
ENV_NUM_PROCESSES = "MCIBI_NUM_PROCESSES"
ENV_PROCESS_ID = "MCIBI_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MCIBI_LOCAL_DEVICE_IDS"


class DistributedConfigError(ValueError):
    """Incomplete or inconsistent multi-process settings."""


def _int(value: int | str, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{what} must be an integer, got {value!r}") from None


def resolve_settings(
    coordinator_address: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict | None:
    """The explicit settings (arguments first, then MCIBI_* variables), checked.

    Returns None when none of coordinator / num_processes / process_id is given, else a dict
    with keys ``coordinator_address`` (str), ``num_processes``, ``process_id`` (int) and
    ``local_device_ids`` (list[int] or None). Raises DistributedConfigError for a partial or
    invalid combination.
    """
    env = os.environ if environ is None else environ
    values = {
        "coordinator_address": (coordinator_address, ENV_COORDINATOR),
        "num_processes": (num_processes, ENV_NUM_PROCESSES),
        "process_id": (process_id, ENV_PROCESS_ID),
    }
    found = {}
    for key, (value, var) in values.items():
        if value is None or value == "":
            value = env.get(var) or None
        found[key] = value
    given = [key for key, value in found.items() if value is not None]
    if not given:
        return None
    missing = [key for key in found if found[key] is None]
    if missing:
        hint = ", ".join(f"{key} ({values[key][1]})" for key in missing)
        raise DistributedConfigError(
            f"multi-process settings are partial: {', '.join(given)} given but {hint} missing; "
            f"set all three, or none for a single process / an auto-detected cluster"
        )
    address = str(found["coordinator_address"])
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedConfigError(f"coordinator address must be host:port, got {address!r}")
    count = _int(found["num_processes"], "num_processes")
    index = _int(found["process_id"], "process_id")
    if count < 1:
        raise DistributedConfigError(f"num_processes must be at least 1, got {count}")
    if not 0 <= index < count:
        raise DistributedConfigError(f"process_id must be in [0, {count}), got {index}")
    devices = local_device_ids
    if devices is None or devices == "":
        devices = env.get(ENV_LOCAL_DEVICE_IDS) or None
    if isinstance(devices, str):
        devices = [_int(d, "local_device_ids entry") for d in devices.split(",") if d.strip()]
    elif devices is not None:
        devices = [_int(d, "local_device_ids entry") for d in devices]
    return {
        "coordinator_address": address,
        "num_processes": count,
        "process_id": index,
        "local_device_ids": devices,
    }


def managed_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The name of a multi-process environment JAX detects itself ("slurm", "ompi", "tpu"), or None.

    SLURM and Open MPI count only with more than one task; a Cloud TPU VM counts when it has
    TPU devices and libtpu (a single-host VM initialises as one process, which is harmless).
    ``environ`` (default: the process environment) replaces os.environ and skips the device check.
    """
    env = os.environ if environ is None else environ
    # The variables JAX's SLURM detection reads; the task count of the job step (srun) when set,
    # so that a plain `python` in a multi-task batch script is not left waiting for its peers.
    if all(
        v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    ):
        tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")
        if _int(tasks, "SLURM_STEP_NUM_TASKS") > 1:
            return "slurm"
    if (
        "OMPI_MCA_orte_hnp_uri" in env
        and _int(env.get("OMPI_COMM_WORLD_SIZE", "1"), "OMPI_COMM_WORLD_SIZE") > 1
    ):
        return "ompi"
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms:
        return None
    if (
        env.get("TPU_WORKER_HOSTNAMES")
        or env.get("TPU_PROCESS_ADDRESSES")
        or env.get("MEGASCALE_COORDINATOR_ADDRESS")
    ):
        return "tpu"
    # A TPU VM: TPU device files and libtpu (JAX's own test for a Cloud TPU VM).
    if (
        environ is None
        and (glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
        and importlib.util.find_spec("libtpu") is not None
    ):
        return "tpu"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    *,
    auto_detect: bool = True,
    initialization_timeout: int = 300,
) -> bool:
    """Joins this process to the others of a multi-process run (``jax.distributed.initialize``).

    Call it once, before any other JAX call that touches devices. Settings come from the
    arguments or the MCIBI_* environment variables (see the module docstring); a single
    process (``num_processes == 1``, or nothing set outside a managed cluster) is a no-op.
    With nothing set inside a Cloud TPU pod, SLURM or Open MPI job (``auto_detect``), JAX's
    own detection supplies the settings. Calling it again after success does nothing.

    Returns True when the distributed system is (now) running, False for a single process.
    Raises DistributedConfigError for partial or invalid settings.
    """
    if jax.distributed.is_initialized():
        return True
    settings = resolve_settings(coordinator_address, num_processes, process_id, local_device_ids)
    if settings is None:
        if not auto_detect or managed_cluster() is None:
            return False
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
        return True
    if settings["num_processes"] == 1:
        return False
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        # Gloo carries the cross-process collectives of CPU devices (the default here; explicit
        # so that a different global default does not leave the processes unable to talk).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings["coordinator_address"],
        num_processes=settings["num_processes"],
        process_id=settings["process_id"],
        local_device_ids=settings["local_device_ids"],
        initialization_timeout=initialization_timeout,
    )
    return True


def is_main_process() -> bool:
    """True on process 0 (the one that should write files and log), and in single-process runs."""
    return jax.process_index() == 0


# Keys of the coordination service's key-value store through which the processes of a run
# learn that one of them failed (failure reports, and what process 0 has shown).
_FAILED = "mcibi/failed/"
_SHOWN = "mcibi/shown"
_GONE = "mcibi/gone/"
_failing = threading.Event()
_exiting = threading.Event()  # set at interpreter exit, before jax.distributed.shutdown


def _client() -> Any:

    return jax_distributed.global_state.client


def _say(message: str) -> None:
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def _wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except Exception:  # the coordinator may already be gone
            return False
        time.sleep(0.05)
    return False


def _try_get(client: Any, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception:  # not set (yet)
        return None


def _peers_gone(client: Any) -> bool:
    return len(client.key_value_dir_get(_GONE)) >= jax.process_count() - 1


def _exit(code: int) -> None:
    # Not sys.exit: jax.distributed.shutdown at exit would wait for the failed process forever.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fail_all(message: str, *, shown: bool = False, code: int = 1) -> None:
    """Ends this process after a failure, and with it every process of the run; never returns.

    The others stop within about a second (see :func:`watch_peers`). The error is shown once:
    process 0 prints it (``error: ...``; one from another process names it), unless ``shown``
    (e.g. a traceback this process printed), and a process whose message process 0 has not
    shown in time prints it itself. With one process it prints the message and exits.
    """
    client = _client() if jax.process_count() > 1 else None
    if client is None:
        if not shown:
            _say(f"error: {message}")
        _exit(code)
    _failing.set()
    index = jax.process_index()
    try:
        client.key_value_set(f"{_FAILED}{index}", json.dumps({"message": message, "shown": shown}))
    except Exception:  # the coordinator is gone: nobody else can be told
        if not shown:
            _say(f"error: {message}")
        _exit(code)
    if index == 0:
        if not shown:
            _say(f"error: {message}")
        client.key_value_set(_SHOWN, message)
        _wait_for(lambda: _peers_gone(client), 5.0)  # keep the coordinator up until the others know
    else:
        if not shown and not _wait_for(lambda: _try_get(client, _SHOWN) == message, 3.0):
            _say(f"error: (process {index}) {message}")
        try:
            client.key_value_set(f"{_GONE}{index}", "1")
        except Exception:
            pass
    _exit(code)


def _watch(poll_seconds: float) -> None:
    client, index = _client(), jax.process_index()
    while not (_failing.is_set() or _exiting.wait(poll_seconds)):
        try:
            reports = client.key_value_dir_get(_FAILED)
        except Exception:  # the coordination service is gone: JAX itself ends the process
            return
        if not reports or _failing.is_set() or _exiting.is_set():
            continue
        failed, report = min(
            (int(key.rsplit("/", 1)[-1]), json.loads(value)) for key, value in reports
        )
        if index == 0:
            _say(
                f"error: process {failed} failed (see its output); stopping every process"
                if report["shown"]
                else f"error: (process {failed}) {report['message']}"
            )
            client.key_value_set(_SHOWN, report["message"])
            _wait_for(lambda: _peers_gone(client), 5.0)
        else:
            client.key_value_set(f"{_GONE}{index}", "1")
        _exit(1)


def watch_peers(poll_seconds: float = 0.25) -> None:
    """In a multi-process run, starts a daemon thread that ends this process (exit status 1)
    as soon as another one reports a failure with :func:`fail_all`, even while this one waits
    inside a collective for the failed process. No-op with one process."""
    if jax.process_count() > 1 and _client() is not None:
        atexit.register(_exiting.set)  # runs before JAX's own shutdown (registered earlier)
        threading.Thread(
            target=_watch, args=(poll_seconds,), name="mcibi-watch-peers", daemon=True
        ).start()


def describe() -> str:
    """One line: process index / count, local and global devices (for the start of a log)."""
    return (
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
    )


__all__ = [
    "DistributedConfigError",
    "describe",
    "fail_all",
    "initialize",
    "is_main_process",
    "managed_cluster",
    "resolve_settings",
    "watch_peers",
]
