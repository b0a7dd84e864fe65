"""Test helpers shared by the parity tests (the torch reference models are `references`)."""

from __future__ import annotations

import numpy as np


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
