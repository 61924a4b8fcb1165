"""Helpers shared by test modules (test modules never import each other)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(folder: str, name: str) -> ModuleType:
    """``REPO/folder/name.py`` as a module, its folder on ``sys.path`` as when it runs as a script
    (the benchmark and launcher scripts are not part of the package)."""
    if str(REPO / folder) not in sys.path:
        sys.path.insert(0, str(REPO / folder))
    spec = importlib.util.spec_from_file_location(f"_{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
