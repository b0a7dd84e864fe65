"""Shared benchmark helpers."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere: reach `references` and `shapes`
    sys.path.insert(0, str(ROOT))


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64: the agreement of two implementations' outputs."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def timed(fn, repeats: int = 3) -> float:
    """Median wall time of `fn()` over `repeats` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
