"""Train-step benchmark: step time, samples/s and FLOP utilisation, float32 and bfloat16 side by side.

The real `jaxedit.train.step.Trainer` step (flow-matching loss, AdamW, EMA, gradient accumulation)
of two configs on synthetic VAE latents and text embeddings (no data loading, no encoders):
  tiny    flux-kontext-tiny (width 48, 2+2 blocks) trained as configs/kontext_tiny.py
  shapes  flux-kontext-shapes (width 128, 2+4 blocks), the default model, as configs/shapes_dit.py
both on 64x64 images (tiny: 16 target + 16 reference tokens; shapes, whose VAE downsamples by 4:
64 + 64). FLOPs per step are XLA's cost analysis of the same step (all micro-batches as one
batch, which does the same work), scaled by depth as `jaxedit.plan` does (XLA counts a loop
body once); "% matmul" divides the achieved FLOP/s by
that of a 1024^3 matmul of the same dtype timed right after the steps (the machine's attainable
rate under the same load).

    python benchmarks/train.py [--configs tiny,shapes] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import ROOT, timed  # benchmarks/common.py

from jaxedit import configs, presets
from jaxedit.models.flux import abstract_params
from jaxedit.parallel import sharding as sh
from jaxedit.plan import analytic_forward_flops
from jaxedit.train.config import TrainConfig, load_config
from jaxedit.train.step import Trainer

CASES = {
    "tiny": ("flux-kontext-tiny", "configs/kontext_tiny.py"),
    "shapes": ("flux-kontext-shapes", "configs/shapes_dit.py"),
}
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    preset: configs.Preset
    train: TrainConfig
    side: int  # latent grid side (image side / the VAE's downsampling)
    text_tokens: int

    @property
    def tokens(self) -> int:
        return self.text_tokens + 2 * (self.side // 2) ** 2


def make_case(name: str) -> Case:
    preset_name, config = CASES[name]
    preset = presets.get(preset_name)
    train = load_config(ROOT / config)
    side = math.isqrt(train.data.pixel_budget) // preset.vae.downsample
    return Case(name, preset, train, side, preset.t5.max_length)


def make_trainer(case: Case, dtype: str, *, depth=None, scan_layers=True, attention=None) -> Trainer:
    cfg = case.preset.transformer
    if depth is not None:
        cfg = dataclasses.replace(cfg, depth=depth[0], depth_single_blocks=depth[1])
    t = case.train
    return Trainer(
        cfg,
        t.objective,
        t.optim,
        t.steps,
        sh.make_mesh(configs.MeshConfig.parse(t.mesh)),
        dtype=jnp.dtype(dtype),
        remat_policy=t.remat,
        scan_layers=scan_layers,
        attention_impl=attention or t.attention,
    )


def synthetic_batch(case: Case, grad_accum: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[A, b, ...] latents (NHWC) and text embeddings of a global batch of data.batch_size."""
    cfg, rng = case.preset.transformer, np.random.default_rng(seed)
    a, b, s, c = grad_accum, case.train.data.batch_size // grad_accum, case.side, cfg.in_channels // 4
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    return {
        "target": normal(a, b, s, s, c),
        "reference": normal(a, b, s, s, c),
        "txt": normal(a, b, case.text_tokens, cfg.context_in_dim),
        "y": normal(a, b, cfg.vec_in_dim),
    }


def empty_prompt(case: Case):
    if case.train.objective.prompt_dropout == 0:
        return None
    cfg = case.preset.transformer
    return jnp.zeros((case.text_tokens, cfg.context_in_dim)), jnp.zeros((cfg.vec_in_dim,))


def depth_scaled_flops(cfg, flops) -> float:
    """XLA's FLOP count of a step at `cfg`'s depth, from `flops(depth, single)`: the count of the same step
    with `depth` double and `single` single blocks, unrolled, with loop-free (xla) attention. XLA counts a
    loop body once, so a scanned model's count misses all blocks but one; the 2+1, 1+2 and 1+1 variants give
    one double and one single block, scaled by the real depth."""
    c21, c12, c11 = flops(2, 1), flops(1, 2), flops(1, 1)
    return c11 + (cfg.depth - 1) * (c21 - c11) + (cfg.depth_single_blocks - 1) * (c12 - c11)


def step_flops(case: Case, dtype: str) -> float:
    """XLA's FLOPs of one step: the step on the whole batch at once (grad_accum 1), unrolled 2+1,
    1+2 and 1+1 blocks with loop-free attention, scaled by depth (depth_scaled_flops)."""

    def flops(depth: int, single: int) -> float:
        tr = make_trainer(case, dtype, depth=(depth, single), scan_layers=False, attention="xla")
        batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=tr.batch_shardings()[k])
            for k, v in synthetic_batch(case, 1).items()
        }
        with sh.activate(tr.mesh, tr.rules):
            lowered = tr._step.lower(tr.abstract_state, batch, jax.random.key(0), empty_prompt(case))
        return lowered.compile().cost_analysis()["flops"]

    return depth_scaled_flops(case.preset.transformer, flops)


def time_steps(case: Case, dtype: str, repeats: int) -> tuple[float, float]:
    """(compile + first step seconds, median step seconds) of the real (accumulating) step, blocks scanned or
    unrolled as the config says."""
    a = case.train.grad_accum
    tr = make_trainer(case, dtype, scan_layers=case.train.scan_layers)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), abstract_params(case.preset.transformer)
    )
    state = tr.init_state(params)
    batch = {k: jax.device_put(v, tr.batch_shardings()[k]) for k, v in synthetic_batch(case, a).items()}
    key, empty = jax.random.key(0), empty_prompt(case)

    def one():
        nonlocal state
        state, metrics = tr.step(state, batch, key, empty)
        jax.block_until_ready((state, metrics))

    t0 = time.perf_counter()
    one()
    first = time.perf_counter() - t0
    return first, timed(one, repeats)


def matmul_rate(dtype: str, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n^3 matmul in `dtype` (the attainable rate on this machine)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    return 2 * n**3 / timed(lambda: f(x).block_until_ready(), repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,shapes", help=f"comma-separated, of {sorted(CASES)}")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (median) after the first")
    args = p.parse_args()

    print(f"jax {jax.__version__} on {len(jax.devices())} {jax.devices()[0].platform} device(s)")
    columns = ("config", "dtype", "batch", "tokens", "compile s", "step ms", "samples/s", "GFLOP/step",
               "XLA/analytic", "GFLOP/s", "matmul", "% matmul")  # fmt: skip
    rows, ratios = [], []
    for name in args.configs.split(","):
        case = make_case(name)
        t, cfg = case.train, case.preset.transformer
        print(
            f"{name}: {case.preset.name} (width {cfg.hidden_size}, {cfg.depth}+{cfg.depth_single_blocks} blocks), "
            f"batch {t.data.batch_size} in {t.grad_accum} micro-batch(es), remat {t.remat}, mesh {t.mesh}, "
            f"{case.text_tokens} text + 2 x {(case.side // 2) ** 2} image tokens"
        )
        analytic = 3 * t.data.batch_size * analytic_forward_flops(cfg, case.tokens)
        step_s = {}
        for dtype in DTYPES:
            flops = step_flops(case, dtype)
            first, step_s[dtype] = time_steps(case, dtype, args.repeats)
            rate, peak = flops / step_s[dtype], matmul_rate(dtype)  # the matmul right after: same load
            batch = f"{t.grad_accum}x{t.data.batch_size // t.grad_accum}"
            rows.append((name, dtype, batch, case.tokens, f"{first:.1f}", f"{1e3 * step_s[dtype]:.1f}",
                         f"{t.data.batch_size / step_s[dtype]:.1f}", f"{flops / 1e9:.3f}", f"{flops / analytic:.2f}",
                         f"{rate / 1e9:.2f}", f"{peak / 1e9:.1f}", f"{100 * rate / peak:.1f}%"))  # fmt: skip
        ratios.append(f"{name}: bfloat16 / float32 step time = {step_s['bfloat16'] / step_s['float32']:.2f}x")
    widths = [max(len(str(r[i])) for r in (columns, *rows)) for i in range(len(columns))]
    print()
    for r in (columns, *rows):
        print("  ".join(f"{str(c):<{w}}" if i < 2 else f"{str(c):>{w}}" for i, (c, w) in enumerate(zip(r, widths))))
    print("\n".join(ratios))
    print(f"(median of {args.repeats} steps; compile s = compilation + first step; GFLOP/s: XLA's count / step time;")
    print(" matmul: GFLOP/s of a 1024^3 matmul of the same dtype timed right after the steps)")


if __name__ == "__main__":
    main()
