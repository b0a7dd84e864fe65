"""Flow-matching sampling for FLUX-family models: sizes, packing, ids, schedule, Euler loop.

Conventions (BFL `flux/sampling.py`, diffusers `pipeline_flux_kontext.py`):
- latents are NHWC here: z [B, h, w, 16] with h, w = H/8, W/8;
- packing 2x2 patches: [B, h, w, C] -> [B, (h/2)(w/2), C*4], feature index c*4 + ph*2 + pw;
- tokens [text | target | references]: the model puts the text first; the image tokens are the target's, then
  each reference's in order (`edit_tokens`), and the model's output is sliced to the target's; ids (index,
  row, col) (`edit_ids`): 0 for the target, 1 for the Kontext reference (Step1X-Edit: 0); text ids zero;
  several references: one of REFERENCE_IDS (`reference_ids`), each equal to the above for one; sampling
  (both families' pipelines) and training (`jaxedit.train.objective`) build them with these functions;
- classifier-free guidance (Kontext's true CFG, Step1X-Edit's CFG): `guide`, u + w (c - u) in float32;
- x_t = (1 - t) x0 + t noise, velocity v = noise - x0; Euler x <- x + (t_prev - t_curr) v;
- schedule linspace(1, 0, N + 1) shifted by time_shift(mu) with mu linear in the number
  of TARGET tokens (reference tokens not counted).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def floor_size(width: int, height: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) floored to a multiple (16: VAE x8 times 2x2 packing)."""
    return width // multiple * multiple, height // multiple * multiple


def pack(z_BHWC: jax.Array) -> jax.Array:
    """[B, h, w, C] -> [B, (h/2)(w/2), C*4] (feature c*4 + ph*2 + pw)."""
    b, h, w, c = z_BHWC.shape
    x = z_BHWC.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x_BLF: jax.Array, h: int, w: int) -> jax.Array:
    """[B, (h/2)(w/2), C*4] -> [B, h, w, C] (inverse of `pack`; h, w latent sizes)."""
    b, _, f = x_BLF.shape
    c = f // 4
    x = x_BLF.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h, w, c)


def image_ids(h2: int, w2: int, index: float = 0.0, row: int = 0, col: int = 0) -> np.ndarray:
    """Ids [(h2*w2), 3] float32 of a packed grid of h2 x w2 tokens: (index, row + r, col + c)."""
    ids = np.zeros((h2, w2, 3), np.float32)
    ids[..., 0] = index
    ids[..., 1] = row + np.arange(h2)[:, None]
    ids[..., 2] = col + np.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3)


# How several reference grids are told apart (each gives (1, row, col) for a single reference):
#   community  diffusers' examples/community/pipeline_flux_kontext_multiple_images.py: every reference
#              resized to the FIRST one's size (by the pipeline: `SAME_SIZE_REFERENCE_IDS`); index 1, the
#              columns of reference i (from 0) shifted by i x ITS number of token rows (as written there:
#              rows, not columns; with equal square references they sit side by side)
#   community-own-sizes  the community's ids, each reference at its own size (jaxedit's "community" before
#              #35 item 14, and what training with "community" sees: each source in its own bucket)
#   offset     ComfyUI's default ("offset" ref_latents_method): index 1, each reference placed on a growing
#              canvas, right of it when placing it below would make the canvas taller than wide, else below
#   index      ComfyUI's "index": reference i gets index i + 1, rows and columns from 0
REFERENCE_IDS = ("community", "community-own-sizes", "offset", "index")
SAME_SIZE_REFERENCE_IDS = ("community",)  # conventions whose references all take the first reference's size


def reference_ids(grids: list[tuple[int, int]], convention: str = "community") -> np.ndarray:
    """Ids [sum h2*w2, 3] float32 of reference grids [(h2, w2) tokens, ...] in order, per `convention`
    (one of REFERENCE_IDS)."""
    if convention not in REFERENCE_IDS:
        raise ValueError(f"reference ids {convention!r}: use one of {', '.join(REFERENCE_IDS)}")
    out, canvas_h, canvas_w = [], 0, 0
    for i, (h2, w2) in enumerate(grids):
        if convention in ("community", "community-own-sizes"):
            out.append(image_ids(h2, w2, 1.0, col=i * h2))
        elif convention == "index":
            out.append(image_ids(h2, w2, float(i + 1)))
        else:
            right = h2 + canvas_h > w2 + canvas_w
            row, col = (0, canvas_w) if right else (canvas_h, 0)
            canvas_h, canvas_w = max(canvas_h, row + h2), max(canvas_w, col + w2)
            out.append(image_ids(h2, w2, 1.0, row, col))
    return np.concatenate(out) if out else np.zeros((0, 3), np.float32)


def edit_ids(
    h2: int, w2: int, grids: list[tuple[int, int]], convention: str = "community", ref_index: float = 1.0
) -> np.ndarray:
    """Ids [h2 w2 + sum of the reference grids' tokens, 3] float32 of the image tokens [target | references]:
    the target's h2 x w2 grid (index 0), then the reference grids [(rh2, rw2), ...] in order: one reference
    (ref_index, row, col) (Kontext: 1; Step1X-Edit: 0, the target's own ids), several per `convention`
    (`reference_ids`; ref_index must then be 1), none: the target's alone."""
    if len(grids) == 1:
        refs = image_ids(*grids[0], ref_index)
    elif ref_index != 1.0:
        raise ValueError(f"several references take their ids from reference_ids, not ref_index={ref_index}")
    else:
        refs = reference_ids(grids, convention)
    return np.concatenate([image_ids(h2, w2, 0.0), refs])


def edit_tokens(target_BLF: jax.Array, references: list[jax.Array]) -> jax.Array:
    """The image tokens [target | references] [B, Lt + sum Lr, F]: the packed references (each [B, Lr, F]) after
    the target's, cast to its dtype (no reference: the target's alone). The model's output [:, :Lt] is the
    target's."""
    if not references:
        return target_BLF
    return jnp.concatenate([target_BLF, *(r.astype(target_BLF.dtype) for r in references)], axis=1)


def guide(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance u + w (c - u), computed in float32 (cond: the prompt's prediction, uncond: the
    negative prompt's; Kontext's true CFG and Step1X-Edit's CFG alike)."""
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    return uncond + scale * (cond - uncond)


def flux_mu(image_seq_len: int, base_len=256, max_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """Resolution-dependent shift: linear in the number of target tokens."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def time_shift(mu: float, t: np.ndarray) -> np.ndarray:
    """e^mu / (e^mu + (1/t - 1)); t = 0 maps to 0."""
    t = np.asarray(t, np.float64)
    with np.errstate(divide="ignore"):
        return np.where(t > 0, math.exp(mu) / (math.exp(mu) + (1 / np.where(t > 0, t, 1) - 1)), 0.0)


def flux_schedule(steps: int, image_seq_len: int, scheduler: Any = None, *, shift: bool = True) -> np.ndarray:
    """Timesteps t_0 = 1 > ... > t_N = 0, float32 [steps + 1] (computed in float64). scheduler: a
    `jaxedit.configs.FluxSchedulerConfig` (its shift on/off and mu's line; None: FLUX.1's, shift as given)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = np.linspace(1.0, 0.0, steps + 1)
    c = scheduler
    if c is not None and c.shift:
        t = time_shift(flux_mu(image_seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift), t)
    elif c is None and shift:
        t = time_shift(flux_mu(image_seq_len), t)
    return t.astype(np.float32)


def noise_for_seeds(seeds: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Standard normal noise [B, *shape], item i drawn from its own key `seeds[i]`.

    An item's noise depends only on its seed, never on its batch or the device count.
    """
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys).astype(dtype)


def euler_update(x: jax.Array, v: jax.Array, t_curr, t_prev) -> jax.Array:
    """One Euler step x + (t_prev - t_curr) v, in float32, cast back to x's dtype."""
    return (x.astype(jnp.float32) + (t_prev - t_curr) * v.astype(jnp.float32)).astype(x.dtype)


def euler_sample(
    velocity: Callable[[jax.Array, jax.Array], jax.Array],
    x_BLF: jax.Array,
    timesteps: jax.Array,
) -> jax.Array:
    """Integrate dx/dt = v(x, t) from timesteps[0] to timesteps[-1] with Euler steps.

    One `lax.scan` over the steps: the whole loop is a single XLA program.
    velocity(x [B, L, F], t [B]) -> v [B, L, F]. The update is computed in float32 and
    cast back to x's dtype, as diffusers' scheduler does.
    """
    b = x_BLF.shape[0]

    def step(x, ts):
        t_curr, t_prev = ts
        v = velocity(x, jnp.full((b,), t_curr, jnp.float32))
        return euler_update(x, v, t_curr, t_prev), None

    timesteps = jnp.asarray(timesteps, jnp.float32)
    x, _ = jax.lax.scan(step, x_BLF, (timesteps[:-1], timesteps[1:]))
    return x
