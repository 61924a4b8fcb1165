"""Test-session settings shared by every test and the subprocesses the tests start."""

from __future__ import annotations

import os
import shutil
import tempfile

# Many tests compile the same small models, in this process and in the `python -m mcibi_jax.main`
# subprocesses they start: one persistent XLA compilation cache for the whole session (inherited
# through the environment) turns the repeats into cache reads. Fresh per session, removed after.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="mcibi_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# Compiling is most of this suite's time. XLA:CPU's backend optimisation level only sets how hard
# LLVM optimises the code it generates for fused elementwise and reduction kernels (the HLO
# program and the conv and matmul library kernels stay the same): at level 0 the slow tests compile
# about a third faster (docs/benchmarks.md), and the fixture tolerances hold at either level.
# MCIBI_TEST_XLA_OPT_LEVEL=default keeps XLA's own level. Inherited by subprocesses.
_OPT_LEVEL = os.environ.get("MCIBI_TEST_XLA_OPT_LEVEL", "0")
if _OPT_LEVEL != "default" and "xla_backend_optimization_level" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_backend_optimization_level={_OPT_LEVEL}"]
    ).strip()


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: most tests are compilation-bound (one core each); more than four workers only
    multiply the memory of the big-model tests."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_unconfigure(config) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
