"""Flow-matching objective for Kontext-style editing on packed latents.

Conventions (docs/conventions.md, "Schedule and sampler"):
  x_t = (1 - t) x0 + t noise on the TARGET tokens, regression target v = noise - x0
  (the sampler integrates x <- x + (t_prev - t_curr) v, so the signs must agree);
  reference tokens are concatenated after the target tokens with ids (ref_index, row, col)
  (Kontext: ref_index 1) and are excluded from the loss; the model output is sliced to
  the target tokens. Several references (batch keys reference, reference_1, ...): each packed
  alone, in order, with ids per `reference_ids` (`jaxedit.sampling.reference_ids`, as the pipeline), each
  at its own size (its bucket's): "community" trains as "community-own-sizes", which samples the same way.

The text conditioning is two batch arrays and a model call, a `Conditioning` from the model's family:
FLUX's (the default) `txt` [B, L, D] and the pooled `y` [B, D_y], called with txt_ids, t and guidance;
Step1X-Edit's (`jaxedit.families.step1x`) the Qwen2.5-VL states `txt` with `txt_mask` [B, L], reference ids
equal to the target's (ref_index 0) and t in [0, 1] (its connector scales t by 1000 itself); Qwen-Image-Edit's
(`jaxedit.families.qwen_image`) Qwen2.5-VL states and mask, t in [0, 1] (the pipeline's sigma: its Euler step
x <- x + (sigma_next - sigma) v integrates the same v = noise - x0), positions from the images' shapes.

Timestep sampling (`ObjectiveConfig.timestep`):
  uniform              t ~ U(0, 1)
  logit_normal         t = sigmoid(mean + std * N(0, 1)) (SD3)
then an optional shift t' = s t / (1 + (s - 1) t) (Step1X-Edit uses s = 3.1582), or the
resolution-dependent FLUX shift s = exp(flux_mu(L_target)) (`resolution_shift=True`,
identical to `jaxedit.sampling.time_shift`). Loss weighting (diffusers
`compute_loss_weighting_for_sd3`): none (1), sigma_sqrt (t^-2), cosmap
(2 / (pi (1 - 2t + 2t^2))). Loss = mean over the batch of weight * mean over tokens and
features of (pred - v)^2, in float32.

Edit-region weighting (`changed_weight` != 1, for a reference the size of the target): target
tokens whose mean |target - reference| latent difference exceeds `changed_threshold` (the
tokens the edit changes) weigh `changed_weight`, the others 1, and the token mean becomes
sum(w e) / sum(w) per sample. When the target is a function of (reference, instruction), as in
shapes, this leaves the optimum unchanged and spends more of the gradient on the
edit than on copying the reference, which a model learns first. (On the shapes task a weight
of 4 lowered the default model's score: docs/default_model.md.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import sampling


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    timestep: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # t' = s t / (1 + (s - 1) t); 1 = no shift
    resolution_shift: bool = False  # s = exp(flux_mu(target tokens)); replaces `shift`
    weighting: str = "none"  # none | sigma_sqrt | cosmap
    guidance: float | tuple[float, float] = 1.0  # fixed value or U(lo, hi) per sample
    prompt_dropout: float = 0.0  # probability of replacing (txt, y) by the empty prompt's
    ref_index: float = 1.0  # first id coordinate of reference tokens (Kontext: 1)
    reference_ids: str = "community"  # ids of several references (sampling.REFERENCE_IDS; sample with the same,
    # "community" as "community-own-sizes": training keeps each reference's own size)
    changed_weight: float = 1.0  # loss weight of target tokens the edit changes (1: plain mean)
    changed_threshold: float = 0.1  # mean |target - reference| latent difference of a "changed" token

    def __post_init__(self):
        if self.timestep not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep {self.timestep!r}: use 'uniform' or 'logit_normal'")
        if self.weighting not in ("none", "sigma_sqrt", "cosmap"):
            raise ValueError(f"weighting {self.weighting!r}: use 'none', 'sigma_sqrt' or 'cosmap'")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout {self.prompt_dropout} is not a probability")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not self.changed_weight > 0:
            raise ValueError(f"changed_weight must be > 0, got {self.changed_weight}")
        if not self.changed_threshold >= 0:
            raise ValueError(f"changed_threshold must be >= 0, got {self.changed_threshold}")
        if self.reference_ids not in sampling.REFERENCE_IDS:
            raise ValueError(f"reference_ids {self.reference_ids!r}: use one of {', '.join(sampling.REFERENCE_IDS)}")


def shift_timesteps(t: jax.Array, s: float | jax.Array) -> jax.Array:
    """t' = s t / (1 + (s - 1) t) (= sampling.time_shift(log s, t))."""
    return s * t / (1.0 + (s - 1.0) * t)


def sample_timesteps(cfg: ObjectiveConfig, key: jax.Array, batch: int, n_target_tokens: int) -> jax.Array:
    """t [B] float32 in (0, 1) per `cfg` (sampling, then shift)."""
    if cfg.timestep == "uniform":
        t = jax.random.uniform(key, (batch,), jnp.float32)
    else:
        t = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (batch,), jnp.float32))
    if cfg.resolution_shift:
        t = shift_timesteps(t, math.exp(sampling.flux_mu(n_target_tokens)))
    elif cfg.shift != 1.0:
        t = shift_timesteps(t, cfg.shift)
    return t


def loss_weight(cfg: ObjectiveConfig, t: jax.Array) -> jax.Array:
    """Per-sample weight [B] (diffusers compute_loss_weighting_for_sd3)."""
    if cfg.weighting == "sigma_sqrt":
        return t**-2.0
    if cfg.weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    return jnp.ones_like(t)


def sample_guidance(cfg: ObjectiveConfig, key: jax.Array, batch: int) -> jax.Array:
    """Guidance [B] float32: the fixed value, or U(lo, hi)."""
    if isinstance(cfg.guidance, tuple | list):
        lo, hi = cfg.guidance
        return jax.random.uniform(key, (batch,), jnp.float32, lo, hi)
    return jnp.full((batch,), cfg.guidance, jnp.float32)


def reference_keys(batch: dict) -> list[str]:
    """The batch's reference latents in order: "reference", "reference_1", ..."""
    return ["reference"] + [f"reference_{i}" for i in range(1, 1 + sum(k.startswith("reference_") for k in batch))]


def edit_ids(cfg: ObjectiveConfig, h2: int, w2: int, grids: list[tuple[int, int]]) -> np.ndarray:
    """img ids [(h2 w2) + sum of the reference grids' tokens, 3]: the target grid, then the references
    [(rh2, rw2), ...]: one with (ref_index, row, col), several per cfg.reference_ids (`sampling.edit_ids`, as the
    pipelines sample)."""
    return sampling.edit_ids(h2, w2, grids, cfg.reference_ids, cfg.ref_index)


def draw(cfg: ObjectiveConfig, key: jax.Array, target_BhwC: jax.Array) -> dict[str, jax.Array]:
    """The random quantities of one step: t [B], noise [B, h, w, C], guidance [B], drop [B] (bool)."""
    b, h, w, _ = target_BhwC.shape
    kt, kn, kg, kd = jax.random.split(key, 4)
    return {
        "t": sample_timesteps(cfg, kt, b, (h // 2) * (w // 2)),
        "noise": jax.random.normal(kn, target_BhwC.shape, jnp.float32),
        "guidance": sample_guidance(cfg, kg, b),
        "drop": jax.random.bernoulli(kd, cfg.prompt_dropout, (b,)),
    }


def changed_token_weights(cfg: ObjectiveConfig, target: jax.Array, reference: jax.Array) -> jax.Array:
    """[B, L] loss weights of the packed target tokens: `changed_weight` where the token's mean
    |target - reference| exceeds `changed_threshold`, else 1."""
    if target.shape != reference.shape:
        raise ValueError(
            f"changed_weight needs a reference the size of the target: target latents {target.shape[1:3]}, "
            f"reference {reference.shape[1:3]}"
        )
    diff = jnp.mean(jnp.abs(sampling.pack(target.astype(jnp.float32) - reference.astype(jnp.float32))), axis=-1)
    return jnp.where(diff > cfg.changed_threshold, cfg.changed_weight, 1.0)


def flux_call(apply_fn, params, img, img_ids, txt, y, t, guidance):
    """The FLUX DiT's call in the loss: apply_fn(params, img, img_ids, txt, txt_ids (zeros), t, y, guidance)."""
    txt_ids = jnp.zeros((txt.shape[0], txt.shape[1], 3), jnp.float32)
    return apply_fn(params, img, img_ids, txt, txt_ids, t, y, guidance)


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """How the loss feeds a family's text conditioning to the model: the batch keys of the prompt's two arrays
    (embeddings, then FLUX's pooled `y` or Step1X-Edit's / Qwen-Image's `txt_mask`), the call
    (apply_fn, params, img, img_ids, txt, second, t [B], guidance [B]) -> [B, L, F] (None: `flux_call`), and
    the image positions the call gets as img_ids: positions(cfg, batch, (h2, w2) of the target, the references'
    [(rh2, rw2), ...]) (None: `edit_ids` [B, L, 3] over the batch; Qwen-Image's: its static img_shapes, the
    model placing its tokens by the images' shapes)."""

    keys: tuple[str, str] = ("txt", "y")
    call: Callable | None = None
    positions: Callable | None = None


def flow_matching_loss(
    cfg: ObjectiveConfig,
    apply_fn,
    params: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    empty: tuple[jax.Array, jax.Array] | None = None,
    text: Conditioning | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and metrics for one batch.

    apply_fn(params, img [B, Li, F], img_ids [B, Li, 3], txt, txt_ids, t [B], y, guidance [B]) -> [B, Li, F]
    (e.g. `lambda p, *a: Flux(...).apply({"params": p}, *a)`), called through `text.call` (default FLUX's);
    Step1X-Edit's: apply_fn(params, img, img_ids, txt, txt_mask, t [B] in [0, 1]) (`Step1XEdit.apply`).
    batch: target [B, h, w, C] and reference [B, rh, rw, C] VAE latents (NHWC, float32) (several
        references: also reference_1 [B, rh1, rw1, C], ...),
        txt [B, Lt, D_txt], y [B, D_y] (Kontext) or txt_mask [B, Lt] (Step1X-Edit); optionally
        empty_txt [B, Lt, D_txt] and empty_mask [B, Lt]: each item's empty prompt (Step1X-Edit's
        Qwen sees the item's image too), used by prompt dropout instead of `empty`.
    empty: (txt [Lt, D_txt], y [D_y]) (Step1X-Edit: (txt, txt_mask [Lt])) of the empty prompt;
        prompt_dropout > 0 needs it or the batch's empty_txt / empty_mask.
    text: the family's text conditioning (batch keys and model call); None: FLUX's.
    """
    x0 = batch["target"].astype(jnp.float32)
    refs = [batch[k] for k in reference_keys(batch)]
    ref = refs[0]
    b, h, w, _ = x0.shape
    r = draw(cfg, key, x0)
    t = r["t"]
    noise = r["noise"]
    tb = t[:, None, None, None]
    x_t = sampling.pack((1.0 - tb) * x0 + tb * noise)
    v = sampling.pack(noise - x0)
    text = text or Conditioning()
    cond = [batch[k] for k in text.keys]
    if cfg.prompt_dropout > 0:
        if "empty_txt" in batch:
            empty = (batch["empty_txt"], batch["empty_mask"])
        elif empty is None:
            raise ValueError("prompt_dropout > 0 needs the empty prompt's embedding (`empty`)")
        else:
            empty = tuple(e[None] for e in empty)
        drop = r["drop"]
        cond = [jnp.where(drop.reshape(-1, *[1] * (c.ndim - 1)), e.astype(c.dtype), c) for c, e in zip(cond, empty)]
    txt, second = cond  # e.g. y (FLUX) or txt_mask (Step1X-Edit)
    grids = [(r.shape[1] // 2, r.shape[2] // 2) for r in refs]
    if text.positions is None:
        ids = edit_ids(cfg, h // 2, w // 2, grids)
        ids = jnp.broadcast_to(ids, (b, *ids.shape))
    else:
        ids = text.positions(cfg, b, (h // 2, w // 2), grids)
    img = sampling.edit_tokens(x_t, [sampling.pack(r.astype(jnp.float32)) for r in refs])  # [target | references]
    pred = (text.call or flux_call)(apply_fn, params, img, ids, txt, second, t, r["guidance"])[:, : x_t.shape[1]]
    per_token = jnp.mean(jnp.square(pred.astype(jnp.float32) - v), axis=2)  # [B, L]
    if cfg.changed_weight == 1.0:
        per_sample = jnp.mean(per_token, axis=1)
    else:
        w = changed_token_weights(cfg, x0, ref)
        per_sample = jnp.sum(w * per_token, axis=1) / jnp.sum(w, axis=1)
    loss = jnp.mean(loss_weight(cfg, t) * per_sample)
    return loss, {"loss": loss, "mse": jnp.mean(per_sample), "t_mean": jnp.mean(t)}
