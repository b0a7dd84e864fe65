"""Step caching compiled into the sampling loop (issue #40 item 1): first-block cache, a TeaCache-style signal
and static schedules.

    pipe.set_cache("fbc:0.08")              # or pipe(..., cache="fbc:0.08"), --cache fbc:0.08, folder option "cache"
    pipe.set_cache("tea:0.4")               # TeaCache's signal and rule (see below)
    pipe.set_cache("schedule:skips.json")   # a precalibrated schedule (`calibrate`)

The DiT runs as two parts with the same parameters (`SplitDiT`: the embedding and the first double block(s), then
the other blocks: `dit_parts` of a model's `embed`, `first_blocks`, `rest_blocks`, `finish`; FLUX.1 Kontext and
Step1X-Edit share `jaxedit.models.flux.Flux`'s, Qwen-Image-Edit has
`jaxedit.models.qwen_image.QwenImageTransformer`'s). At each step the first part always runs; the rest's output
residual (hidden states after all blocks minus the first part's output, image tokens) is kept in the loop's carry,
and a step that reuses it adds it to the first part's output instead of running the rest: a `lax.cond` inside the
scanned loop, so a skipped step really skips those blocks.

first-block cache ("fbc:THRESHOLD"): the signal is the first part's own residual (its output minus its input,
image tokens); a step reuses when its relative mean absolute change to the residual of the last step the item
COMPUTED is below the threshold (ParaAttention's rule); the first `warmup` steps always compute.

TeaCache ("tea:THRESHOLD", ali-vilab/TeaCache's TeaCache4FLUX rule): the signal is the first double block's
MODULATED image input (LayerNorm of the embedded image tokens, times 1 + scale, plus shift, of the block's first
image modulation: `first_modulated`), compared with the previous STEP's (every step, computed or not) by relative
L1 (mean |a - b| / mean |b|). That distance, rescaled by the model's polynomial (`SplitDiT.rescale`, coefficients
highest power first, as numpy.poly1d; negative values count 0), is accumulated over the steps since the item last
computed; the step reuses while the accumulation stays below the threshold, else it computes and the accumulation
restarts at 0. The first and the last step always compute (TeaCache's rule). The polynomial is the family's:
FLUX.1 Kontext uses TeaCache4FLUX's, fitted to FLUX.1-dev (TeaCache's suggested thresholds 0.25 / 0.4 / 0.6 / 0.8
for 1.5x / 1.8x / 2.0x / 2.25x at 50 FLUX.1-dev steps); Step1X-Edit and Qwen-Image-Edit have no polynomial fitted
to them here, so their distance is not rescaled (rescale None: the plain relative L1) and their thresholds must be
calibrated. Unlike TeaCache, which caches the residual of all the blocks, the first block always runs here (the
same split and the same `lax.cond` as the first-block cache).

The threshold is a run-time argument of the compiled loop (`CacheSpec` is a pytree whose only leaf is the
threshold): another threshold of the same signal reuses the compiled program. A schedule is a compile-time
constant (one program per schedule).

Each item of a batch decides alone: an item that reuses gets its cached residual, an item that computes gets the
blocks' output, so an item's result does not depend on its batchmates (nor on the batch size). The blocks are
skipped only on steps when every item of the batch reuses (a batch saves as often as its least-skipping item);
on the other steps the rest runs for the whole batch and the reusing items' outputs are discarded.
Cost: two arrays [B, image tokens, hidden] in the model's dtype per transformer call of a step (the previous
signal and the residual; two calls with true CFG) and one float per item (TeaCache's accumulation), the first part
and the signal's reductions at each step.

static schedule ("schedule:FILE", or a tuple of booleans): step i reuses iff skips[i]; the predicate is a constant
of the program, the same for every item, batch size and device (no signal is computed). `calibrate` records
which steps a first-block cache skipped on a few items (`write_schedule`: a JSON file).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import sampling

SIGNALS = ("fbc", "tea")  # first-block cache, TeaCache


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """How the loop caches: `threshold` of a `signal` (fbc: first-block cache; tea: TeaCache) or `skips` (a static
    schedule, one per step). A pytree: the threshold is its leaf (traced: a run-time argument of the jitted
    loop), the rest its static structure."""

    threshold: float | None = None
    skips: tuple[bool, ...] | None = None
    warmup: int = 1  # the first steps always compute
    first: int = 1  # double blocks in the first part
    signal: str = "fbc"  # with a threshold: "fbc" or "tea"

    def __post_init__(self):
        if (self.threshold is None) == (self.skips is None):
            raise ValueError("a step cache has a threshold (fbc, tea) or a schedule (skips), not both nor neither")
        if self.signal not in SIGNALS:
            raise ValueError(f"cache signal {self.signal!r}: use one of {', '.join(SIGNALS)}")
        if self.threshold is not None and not (np.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"cache threshold must be a number >= 0, got {self.threshold!r}")
        if self.skips is not None and self.skips[:1] == (True,):
            raise ValueError("a cache schedule cannot reuse at its first step (nothing is cached yet)")
        if self.warmup < 1 or self.first < 1:
            raise ValueError(f"cache warmup and first must be >= 1, got {self.warmup}, {self.first}")

    @property
    def text(self) -> str:
        if self.threshold is not None:
            return f"{self.signal}:{self.threshold:g}"
        return "schedule:" + "".join("x" if s else "." for s in self.skips)

    def check_steps(self, steps: int) -> None:
        """ValueError unless a schedule has one entry per step."""
        if self.skips is not None and len(self.skips) != steps:
            raise ValueError(f"the cache schedule has {len(self.skips)} steps, the edit {steps}")


def _flatten(spec: CacheSpec):
    return (spec.threshold,), (spec.skips, spec.warmup, spec.first, spec.signal)


def _unflatten(aux, children) -> CacheSpec:
    spec = object.__new__(CacheSpec)  # (no check: inside a trace the threshold is a tracer)
    for name, value in zip(("threshold", "skips", "warmup", "first", "signal"), (*children, *aux)):
        object.__setattr__(spec, name, value)
    return spec


jax.tree_util.register_pytree_node(CacheSpec, _flatten, _unflatten)


def parse(value: Any, base: Path | None = None) -> CacheSpec | None:
    """A cache option -> CacheSpec or None (off): None, "off", "none", a CacheSpec, "fbc:THRESHOLD", "tea:THRESHOLD",
    "schedule:FILE" (relative to `base` when given) or a dict {"threshold": ...} / {"skips": [...]}."""
    if value is None or isinstance(value, CacheSpec):
        return value
    if isinstance(value, dict):
        keys = {f.name for f in dataclasses.fields(CacheSpec)}
        if not set(value) <= keys:
            raise ValueError(f"cache options {sorted(set(value) - keys)} unknown (known: {sorted(keys)})")
        if value.get("skips") is not None:
            value = value | {"skips": tuple(bool(s) for s in value["skips"])}
        return CacheSpec(**value)
    if not isinstance(value, str):
        raise ValueError(f"cache must be {USAGE}, got {value!r}")
    kind, _, arg = value.partition(":")
    if kind in ("off", "none", "") and not arg:
        return None
    if kind in SIGNALS:
        try:
            return CacheSpec(threshold=float(arg), signal=kind)
        except ValueError:
            raise ValueError(f"cache {value!r}: {kind} takes a threshold >= 0, e.g. {kind}:0.08") from None
    if kind == "schedule" and arg:
        return read_schedule(Path(base) / arg if base is not None else Path(arg))
    raise ValueError(f"cache {value!r}: use {USAGE}")


USAGE = "'off', 'fbc:THRESHOLD', 'tea:THRESHOLD' or 'schedule:FILE'"


def read_schedule(path: str | Path) -> CacheSpec:
    """The static schedule of a JSON file written by `write_schedule` ({"skips": [bool per step], ...})."""
    try:
        data = json.loads(Path(path).read_text())
        return CacheSpec(skips=tuple(bool(s) for s in data["skips"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cache schedule {path}: {e}") from None


def write_schedule(path: str | Path, skips_items: np.ndarray, *, threshold: float, agree: float = 1.0) -> dict:
    """Write the schedule calibrated from a first-block cache's decisions [steps, items] (`calibrate`): step i
    reuses when at least `agree` of the items reused it (1: all of them). Returns what was written."""
    from jaxedit.staged import write_file

    s = np.asarray(skips_items, bool)
    skips = [bool(v) for v in s.mean(axis=1) >= agree - 1e-9]
    skips[0] = False
    data = {"steps": len(skips), "skips": skips, "threshold": threshold, "agree": agree, "items": int(s.shape[1]),
            "per_item": s.T.astype(int).tolist(), "calls_saved": int(sum(skips))}  # fmt: skip
    write_file(Path(path), json.dumps(data, indent=1) + "\n")
    return data


def calibrate(pipe, images: list, prompts: list[str], seeds: list[int], threshold: float, *, steps: int | None = None,
              guidance=None, agree: float = 1.0, out: str | Path | None = None, signal: str = "fbc",
              **options) -> dict:  # fmt: skip
    """Run a cache of `threshold` (first-block cache, or `signal` "tea") on a few items, one at a time (each decides
    alone), and record which steps it skipped: {"skips": the schedule, "per_item": ...}, written to `out` (JSON)
    when given."""
    decisions = []
    for image, prompt, seed in zip(images, prompts, seeds):
        pipe([image], [prompt], [seed], steps=steps, guidance=guidance, output="latents",
             cache=CacheSpec(threshold=threshold, signal=signal), **options)  # fmt: skip
        decisions.append(pipe.last_cache_skips[:, 0])
    s = np.stack(decisions, axis=1)
    if out is not None:
        return write_schedule(out, s, threshold=threshold, agree=agree)
    skips = [bool(v) for v in s.mean(axis=1) >= agree - 1e-9]
    return {"steps": len(skips), "skips": skips, "per_item": s.T.astype(int).tolist()}


@dataclasses.dataclass(frozen=True)
class SplitDiT:
    """A DiT as parts with the same parameters: embed(*call args) -> (img, txt, vec, ctx); first(img, txt, vec,
    ctx) -> (img, txt) after the first blocks; rest(img, txt, vec, ctx) -> image hidden states after all blocks;
    finish(hidden, vec) -> the model's output; modulated(img, vec, ctx) -> the first block's modulated image input
    (TeaCache's signal). ctx: what the blocks take besides (img, txt, vec) (FLUX: the ids; Qwen-Image: RoPE, the
    text mask's segments, the target's tokens). rescale: TeaCache's polynomial of the model (numpy.poly1d's
    coefficients) or None (the relative L1 as it is)."""

    embed: Callable
    first: Callable
    rest: Callable
    finish: Callable
    hidden_size: int
    dtype: Any  # the hidden states' (the model's compute dtype)
    modulated: Callable | None = None
    rescale: tuple[float, ...] | None = None


def dit_parts(model, params, first: int = 1, rescale: tuple[float, ...] | None = None) -> SplitDiT:
    """The `SplitDiT` of a DiT module with methods `embed`, `first_blocks`, `rest_blocks`, `finish` and
    `first_modulated` (`jaxedit.models.flux.Flux` and subclasses, `jaxedit.models.qwen_image.QwenImageTransformer`)
    and its parameters; rescale: the model's TeaCache polynomial (the family's)."""

    def call(method, **kw):
        return lambda *a: model.apply({"params": params}, *a, method=method, **kw)

    return SplitDiT(call("embed"), call("first_blocks", n=first), call("rest_blocks", n=first), call("finish"),
                    model.cfg.hidden_size, model.dtype, call("first_modulated"), rescale)  # fmt: skip


def init_state(batch: int, tokens: int, hidden: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cache of one transformer call: (previous signal, rest's residual, TeaCache's accumulated distance [B]
    float32), zeros."""
    z = jnp.zeros((batch, tokens, hidden), dtype)
    return z, z, jnp.zeros((batch,), jnp.float32)


def relative_change(signal: jax.Array, previous: jax.Array) -> jax.Array:
    """Per item: mean |signal - previous| / mean |previous| (float32) [B]."""
    s, p = signal.astype(jnp.float32), previous.astype(jnp.float32)
    axes = tuple(range(1, s.ndim))
    return jnp.mean(jnp.abs(s - p), axis=axes) / jnp.maximum(jnp.mean(jnp.abs(p), axis=axes), 1e-20)


def rescaled(distance: jax.Array, rescale: tuple[float, ...] | None) -> jax.Array:
    """TeaCache's rescaled distance: the polynomial at `distance` (None: the distance), negative values as 0."""
    if rescale is None:
        return distance
    return jnp.maximum(jnp.polyval(jnp.asarray(rescale, jnp.float32), distance), 0.0)


def cached_call(parts: SplitDiT, args: tuple, state: tuple, step: jax.Array, spec: CacheSpec,
                steps: int | None = None):  # fmt: skip
    """One transformer call with the cache -> (output, new state, reused [B] bool). step: the step's index;
    steps: the loop's step count (TeaCache: the last step computes)."""
    img0, txt0, vec, ctx = parts.embed(*args)
    prev_signal, residual, acc = state
    b = img0.shape[0]
    if spec.signal == "tea" and spec.skips is None:
        signal = parts.modulated(img0, vec, ctx)  # before the first block runs
    img1, txt1 = parts.first(img0, txt0, vec, ctx)
    if spec.skips is not None:
        reuse = jnp.broadcast_to(jnp.asarray(spec.skips, bool)[step], (b,))
        new_signal = prev_signal
    elif spec.signal == "tea":
        acc = acc + rescaled(relative_change(signal, prev_signal), parts.rescale)
        edge = (step < spec.warmup) | (step == (-1 if steps is None else steps - 1))
        reuse = ~edge & (acc < spec.threshold)
        acc = jnp.where(reuse, acc, 0.0)
        new_signal = signal.astype(prev_signal.dtype)  # the previous step's, computed or not
    else:
        signal = img1 - img0
        reuse = (step >= spec.warmup) & (relative_change(signal, prev_signal) < spec.threshold)
        new_signal = jnp.where(reuse[:, None, None], prev_signal, signal.astype(prev_signal.dtype))
    cached = img1 + residual.astype(img1.dtype)
    item = reuse[:, None, None]

    def compute():
        return jnp.where(item, cached, parts.rest(img1, txt1, vec, ctx).astype(img1.dtype))

    hidden = jax.lax.cond(jnp.all(reuse), lambda: cached, compute)
    state = (new_signal, jnp.where(item, residual, (hidden - img1).astype(residual.dtype)), acc)
    return parts.finish(hidden, vec), state, reuse


def euler_sample(velocity: Callable, x_BLF: jax.Array, timesteps: jax.Array, state: Any):
    """`jaxedit.sampling.euler_sample` with a carried cache: velocity(x, t [B], state, step) -> (v, state, reused
    [B]) -> (final x, reused [steps, B])."""
    b = x_BLF.shape[0]

    def step(carry, xs):
        x, st = carry
        t_curr, t_prev, i = xs
        v, st, reused = velocity(x, jnp.full((b,), t_curr, jnp.float32), st, i)
        return (sampling.euler_update(x, v, t_curr, t_prev), st), reused

    timesteps = jnp.asarray(timesteps, jnp.float32)
    n = timesteps.shape[0] - 1
    (x, _), reused = jax.lax.scan(step, (x_BLF, state), (timesteps[:-1], timesteps[1:], jnp.arange(n)))
    return x, reused
