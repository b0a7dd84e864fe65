"""Re-draw every parameter of a torch module at random."""

from __future__ import annotations

import numpy as np


def randomize_(module, seed: int = 0, scale: float = 1.0) -> None:
    """Re-draw EVERY parameter of a torch module at random (no zero/identity init left).

    Matrices get N(0, scale / fan_in); vectors (biases, norm weights) get values around
    their usual centre but never the identity: norm-like weights 1 + U(-0.5, 0.5),
    everything else N(0, 0.1 * scale)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * (scale / fan_in) ** 0.5)
            elif name.endswith(
                ("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight", ".scale")
            ) or ("norm" in name and name.endswith("weight")):
                p.copy_(1 + torch.rand(p.shape, generator=g) - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 * scale)
