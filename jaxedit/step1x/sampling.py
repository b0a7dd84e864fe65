"""Step1X-Edit's sampling loop (S1X `inference.py` ImageGenerator.prepare / denoise).

- Size (`step1x_size`): the reference image is resized to about size_level^2 pixels, aspect
  kept, sides floored to multiples of 16; the target has the same size.
- Tokens are [target | reference]; the reference latent has the target's size and the
  SAME ids as the target (first coordinate 0, no offset), unlike Kontext's index 1.
- Classifier-free guidance: one model call on the batch [cond | uncond] (prompt and
  negative prompt, both with the reference image), v = u + w * (c - u).
- Euler steps update only the target tokens; the reference tokens are held fixed.
- Schedule: `jaxedit.sampling.flux_schedule` with the number of TARGET tokens.
(The reference's norm-rescaled guidance branch only runs for t > timesteps_truncate,
which its callers set to 1.0, i.e. never; it is not implemented here.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import sampling, step_cache
from jaxedit.sampling import euler_sample, guide

# model(img [2B, Lt + Lr, F], img_ids [2B, Lt + Lr, 3], llm [2B, L, C], mask [2B, L], t [2B]) -> [2B, Lt + Lr, F]
ModelFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def step1x_size(width: int, height: int, size_level: int = 512) -> tuple[int, int]:
    """(width, height) of area about size_level^2 with the input's aspect, floored to multiples of 16
    (S1X `input_process_image`: the longer side is rounded up first, then the other side)."""
    r = width / height
    if width > height:
        w = math.ceil(math.sqrt(size_level * size_level * r))
        h = math.ceil(w / r)
    else:
        h = math.ceil(math.sqrt(size_level * size_level / r))
        w = math.ceil(h * r)
    return w // 16 * 16, h // 16 * 16


def edit_ids(h2: int, w2: int) -> np.ndarray:
    """Ids [2 * h2 * w2, 3] float32 of [target | reference] grids of h2 x w2 tokens (both index 0:
    `jaxedit.sampling.edit_ids` with ref_index 0)."""
    return sampling.edit_ids(h2, w2, [(h2, w2)], ref_index=0.0)


def model_fn(model, params) -> ModelFn:
    """A `ModelFn` for a `jaxedit.models.step1x.Step1XEdit` and its parameters."""
    return lambda img, ids, llm, mask, t: model.apply({"params": params}, img, ids, llm, mask, t)


def denoise_cfg(
    model: ModelFn,
    x_BLF: jax.Array,
    ref_BLF: jax.Array,
    img_ids_BL3: jax.Array,
    llm_cond: jax.Array,
    mask_cond: jax.Array,
    llm_uncond: jax.Array,
    mask_uncond: jax.Array,
    timesteps: jax.Array,
    guidance_scale: float | jax.Array = 6.0,
    *,
    cache: step_cache.CacheSpec | None = None,
    parts: step_cache.SplitDiT | None = None,
) -> jax.Array:
    """Integrate the target tokens from timesteps[0] to timesteps[-1] under CFG -> [B, Lt, F].

    x_BLF: target tokens (noise at t = 1), ref_BLF [B, Lr, F]: packed reference latent,
    img_ids_BL3 [B, Lt + Lr, 3] (e.g. `edit_ids`), llm_* [B, L, C] and mask_* [B, L]: the
    prompt's and the negative prompt's LLM states, padded to one length L. cache: a step cache
    (`jaxedit.step_cache`) with the model's `SplitDiT` parts: then (final tokens, reused [steps, B]).
    """
    lt = x_BLF.shape[1]
    ids2 = jnp.concatenate([img_ids_BL3, img_ids_BL3], axis=0)
    llm2 = jnp.concatenate([llm_cond, llm_uncond], axis=0)
    mask2 = jnp.concatenate([mask_cond, mask_uncond], axis=0)

    if cache is not None:
        return _denoise_cached(parts, cache, x_BLF, ref_BLF, ids2, llm2, mask2, timesteps, guidance_scale)

    def velocity(x, t_B):
        img = sampling.edit_tokens(x, [ref_BLF])
        img2 = jnp.concatenate([img, img], axis=0)
        pred = model(img2, ids2, llm2, mask2, jnp.concatenate([t_B, t_B]))[:, :lt]
        cond, uncond = jnp.split(pred, 2, axis=0)
        return guide(cond, uncond, guidance_scale)

    return euler_sample(velocity, x_BLF, timesteps)


def _denoise_cached(parts, cache, x_BLF, ref_BLF, ids2, llm2, mask2, timesteps, guidance_scale):
    """`denoise_cfg` with a step cache: one cached call on [cond | uncond] (each of the 2B rows decides alone) ->
    (final target tokens, reused [steps, B]: both of an item's rows reused)."""
    b, lt = x_BLF.shape[0], x_BLF.shape[1]
    state = step_cache.init_state(2 * b, lt + ref_BLF.shape[1], parts.hidden_size, parts.dtype)

    def velocity(x, t_B, st, i):
        img = sampling.edit_tokens(x, [ref_BLF])
        img2 = jnp.concatenate([img, img], axis=0)
        pred, st, reused = step_cache.cached_call(parts, (img2, ids2, llm2, mask2, jnp.concatenate([t_B, t_B])), st,
                                                  i, cache, timesteps.shape[0] - 1)  # fmt: skip
        cond, uncond = jnp.split(pred[:, :lt], 2, axis=0)
        return guide(cond, uncond, guidance_scale), st, reused[:b] & reused[b:]

    return step_cache.euler_sample(velocity, x_BLF, timesteps, state)
