"""mcibi_jax.compilation_cache: where the command-line programs keep compiled programs."""

from __future__ import annotations

import pytest

from mcibi_jax import compilation_cache
from tests.helpers import run_python, subprocess_env


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MCIBI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    assert compilation_cache.cache_folder() == tmp_path / "cache" / "xla"
    for off in ("off", "", "0", "OFF"):
        monkeypatch.setenv(compilation_cache.ENV, off)
        assert compilation_cache.cache_folder() is None
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "elsewhere"))
    assert compilation_cache.cache_folder() == tmp_path / "elsewhere"


def _enable_in_a_fresh_process(tmp_path, **env) -> str:
    environment = subprocess_env()
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test session's own cache
    environment.pop(compilation_cache.ENV, None)
    environment.update(MCIBI_CACHE=str(tmp_path / "cache"), **env)
    code = (
        "import jax; from mcibi_jax import compilation_cache as c; "
        "print(c.enable(), jax.config.jax_compilation_cache_dir)"
    )
    result = run_python(code, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("setting", ["default", "off", "jax"])
def test_enable(tmp_path, setting):
    if setting == "default":
        folder = tmp_path / "cache" / "xla"
        assert _enable_in_a_fresh_process(tmp_path) == f"{folder} {folder}"
        assert folder.is_dir()
    elif setting == "off":
        assert _enable_in_a_fresh_process(tmp_path, MCIBI_COMPILATION_CACHE="off") == "None None"
    else:  # JAX's own setting wins
        own = str(tmp_path / "own")
        assert _enable_in_a_fresh_process(tmp_path, JAX_COMPILATION_CACHE_DIR=own) == f"{own} {own}"
