"""Where the reference's golden data lives, and small helpers to read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# The reference's golden data ships with the tests (tests/reference/, a copy of what the reference's
# generator wrote); MCIBI_SHARED points at another copy, MCIBI_FIXTURES at another fixture set.
REFERENCE = Path(os.environ.get("MCIBI_SHARED", Path(__file__).resolve().parent / "reference"))
FIXTURES = Path(os.environ.get("MCIBI_FIXTURES", REFERENCE / "fixtures"))
KEYS = REFERENCE / "keys"


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


def read_float64_truth(case: str) -> dict:
    """The same training step run by the reference in float64 (``<case>.f64.npz``)."""
    return dict(np.load(FIXTURES / f"{case}.f64.npz"))


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference relative to the max magnitude of ``want``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    return float(np.abs(got - want).max() / (scale if scale > 0 else 1.0))
