"""Optimizer: AdamW with linear warmup + cosine or constant schedule, global-norm clipping and
a weight-decay mask (decay on matrix kernels and LoRA factors only: no decay on biases, norm
scales, 1-D params)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (after warmup)
    decay_steps: int = 0  # cosine length after warmup (0: the run's total steps)
    final_lr_fraction: float = 0.0  # cosine end value = lr * final_lr_fraction
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0  # global-norm clipping (None: off)
    ema_decay: float | None = None  # EMA of the parameters (None: off)

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule {self.schedule!r}: use 'constant' or 'cosine'")


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then constant or cosine decay to lr * final_lr_fraction."""
    if cfg.schedule == "cosine":
        decay = cfg.decay_steps or max(total_steps - cfg.warmup_steps, 1)
        after = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.final_lr_fraction)
    else:
        after = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps <= 0:
        return after
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: leaves named `kernel` (matrices; also when stacked over layers)
    and the LoRA factors `a`, `b` (jaxedit.train.lora)."""

    def is_kernel(path, leaf) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name in ("kernel", "a", "b") and leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> adamw(schedule, mask=decay_mask)."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(
        optax.adamw(
            learning_rate(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
