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


def diffusers_flux(cfg, x: dict):
    """(our parameters, diffusers' forward): diffusers' FluxTransformer2DModel with `cfg`'s sizes, every
    parameter random (references/models.py), converted by our converter; the forward runs eagerly under
    torch.no_grad on the inputs `x` (img, img_ids, txt, txt_ids, t, y, guidance as numpy)."""
    import tempfile

    import torch

    from checkpoints_convert import load_transformer
    from references.models import flux_transformer

    ref = flux_transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        params = load_transformer(d, cfg)
    tt = {k: torch.from_numpy(v) for k, v in x.items()}

    def forward():
        with torch.no_grad():
            return ref(hidden_states=tt["img"], encoder_hidden_states=tt["txt"], pooled_projections=tt["y"],
                       timestep=tt["t"], img_ids=tt["img_ids"], txt_ids=tt["txt_ids"], guidance=tt["guidance"],
                       return_dict=False)[0]  # fmt: skip

    return params, forward
