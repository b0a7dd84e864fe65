"""Qwen-Image-Edit's sampling: diffusers' `FlowMatchEulerDiscreteScheduler` schedule as the edit pipelines set it
(sigmas linspace(1, 1/N, N), the resolution-dependent shift mu, exponential time shift, stretched to end at
`shift_terminal`), true classifier-free guidance with norm rescaling, and the jitted Euler loop over
[target | references] tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import step_cache
from jaxedit.configs import SchedulerConfig
from jaxedit.sampling import edit_tokens, euler_update

__all__ = ["SchedulerConfig", "calculate_shift", "denoise", "denoise_cached", "guide", "schedule"]


def calculate_shift(image_seq_len: int, cfg: SchedulerConfig) -> float:
    """mu, linear in the target's token count (the pipelines' `calculate_shift`)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + cfg.base_shift - m * cfg.base_image_seq_len


def schedule(steps: int, image_seq_len: int, cfg: SchedulerConfig | None = None) -> np.ndarray:
    """[2, steps + 1] float32: the sigmas 1 > ... > 0 (the Euler steps' times) and the transformer's timestep at
    each (sigma * 1000 / 1000 in float32, as the pipeline divides the scheduler's timesteps by 1000). cfg: the
    scheduler's settings (default Qwen-Image's)."""
    cfg = cfg or SchedulerConfig()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1 and cfg.shift_terminal:  # the stretch divides by 1 - sigma = 0 (diffusers' sigmas are NaN)
        raise ValueError(f"1 step cannot end at shift_terminal {cfg.shift_terminal}: use 2 or more steps, or a "
                         "scheduler without shift_terminal (a few-step LoRA's)")  # fmt: skip
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, cfg)
        if cfg.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    if cfg.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    sigmas = np.asarray(sigmas, np.float32)
    model_t = (sigmas * np.float32(cfg.num_train_timesteps)) / np.float32(1000)
    return np.stack([np.append(sigmas, np.float32(0)), np.append(model_t, np.float32(0))]).astype(np.float32)


def guide(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    """True CFG with norm rescaling: uncond + scale (cond - uncond), rescaled per token to the norm of cond
    (float32)."""
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    comb = uncond + scale * (cond - uncond)
    cond_norm = jnp.linalg.norm(cond, axis=-1, keepdims=True)
    return comb * (cond_norm / jnp.linalg.norm(comb, axis=-1, keepdims=True))


ModelFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]  # (img, txt, mask, t) -> velocity


def denoise(model: ModelFn, x_BLF, ref_BLF, txt, mask, negative, scale, times) -> jax.Array:
    """Euler from sigma 1 to 0 over `times` ([2, N + 1]: `schedule`): the transformer on [target | references]
    (its output's target tokens), with true CFG when `negative` = (txt, mask) is given. The step is float32,
    cast back to x's dtype (diffusers' scheduler)."""
    n, b = x_BLF.shape[1], x_BLF.shape[0]

    def velocity(x, t):
        inp = edit_tokens(x, [] if ref_BLF is None else [ref_BLF])
        pos = model(inp, txt, mask, t)[:, :n]
        if negative is None:
            return pos
        neg = model(inp, *negative, t)[:, :n]
        return guide(pos, neg, scale)

    def step(x, s):
        sigma, sigma_next, t = s
        v = velocity(x, jnp.full((b,), t, jnp.float32))
        return (x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)).astype(x_BLF.dtype), None

    times = jnp.asarray(times, jnp.float32)
    x, _ = jax.lax.scan(step, x_BLF, (times[0, :-1], times[0, 1:], times[1, :-1]))
    return x


def denoise_cached(parts: step_cache.SplitDiT, cache: step_cache.CacheSpec, x_BLF, ref_BLF, txt, mask, negative, scale,
                   times, img_shapes):  # fmt: skip
    """`denoise` with a step cache (`jaxedit.step_cache`) on the DiT's parts (`step_cache.dit_parts`): one cache
    per transformer call (true CFG: the prompt's and the negative prompt's, each item deciding alone in each) ->
    (final target tokens, reused [steps, B]: with true CFG both of an item's calls reused)."""
    n, b, dtype = x_BLF.shape[1], x_BLF.shape[0], parts.dtype
    times = jnp.asarray(times, jnp.float32)
    steps = times.shape[1] - 1
    tokens = n + (0 if ref_BLF is None else ref_BLF.shape[1])
    state = step_cache.init_state(b, tokens, parts.hidden_size, dtype)
    state = (state, None if negative is None else state)

    def step(carry, s):
        x, st = carry
        sigma, sigma_next, t, i = s
        inp = edit_tokens(x, [] if ref_BLF is None else [ref_BLF]).astype(dtype)
        t_B = jnp.full((b,), t, jnp.float32)
        pos, s_pos, reused = step_cache.cached_call(parts, (inp, txt.astype(dtype), mask, t_B, img_shapes), st[0], i,
                                                    cache, steps)  # fmt: skip
        if negative is None:
            v, st = pos[:, :n], (s_pos, None)
        else:
            neg, s_neg, r_neg = step_cache.cached_call(
                parts, (inp, negative[0].astype(dtype), negative[1], t_B, img_shapes), st[1], i, cache, steps
            )
            v, st, reused = guide(pos[:, :n], neg[:, :n], scale), (s_pos, s_neg), reused & r_neg
        return (euler_update(x, v, sigma, sigma_next), st), reused

    xs = (times[0, :-1], times[0, 1:], times[1, :-1], jnp.arange(steps))
    (x, _), reused = jax.lax.scan(step, (x_BLF, state), xs)
    return x, reused
