"""Where the reference's golden data lives, and small helpers to read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MCIBI_SHARED", REPO.parent / "shared" / "reference"))
FIXTURES = Path(os.environ.get("MCIBI_FIXTURES", SHARED / "fixtures"))
KEYS = SHARED / "keys"


def model_cases() -> list[str]:
    """Every fixture case with a reference config (discovered, never listed by hand)."""
    cases = []
    for path in sorted(FIXTURES.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "reference_config" in data:
            cases.append(path.stem)
    return cases


def read_case(case: str) -> tuple[dict, dict]:
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    arrays = dict(np.load(FIXTURES / f"{case}.npz"))
    return meta, arrays


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference relative to the max magnitude of ``want``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    return float(np.abs(got - want).max() / (scale if scale > 0 else 1.0))
