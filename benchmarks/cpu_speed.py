"""jaxedit on this CPU, the three ratios of issue #26, measured side by side in one run (interleaved rounds,
medians), with the f32 matmul rate of the same run:

1. the DiT forward, jaxedit (jit) over diffusers' FluxTransformer2DModel (eager, torch.no_grad), same
   random weights (converted by our converter) and inputs;  target: at most 0.8x
2. the train step (`jaxedit.train.step.Trainer`: flow-matching loss, gradients, AdamW), its model FLOPs
   (3 forwards of `jaxedit.plan.analytic_forward_flops` a sample) per second over the matmul rate;
   target: at least 50%
3. the jitted sampling loop (`KontextPipeline.denoise`, N Euler steps) over N bare jitted forwards;
   target: at most 1.05x

Medium config, float32: width 768, 12 heads of 64, 4 double + 8 single blocks, 128 text + 1,024 target
(32 x 32) + 512 reference (32 x 16) tokens, batch 1.

    python benchmarks/cpu_speed.py [--rounds 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import diffusers_flux  # benchmarks/common.py

from jaxedit import configs, presets
from jaxedit.configs import FluxConfig
from jaxedit.models import Flux
from jaxedit.plan import analytic_forward_flops

MEDIUM = FluxConfig(hidden_size=768, num_heads=12, depth=4, depth_single_blocks=8, axes_dim=(8, 28, 28),
                    context_in_dim=4096, vec_in_dim=768)  # fmt: skip
TEXT, TARGET, REFERENCE = 128, (32, 32), (32, 16)


def grid_ids(h: int, w: int, index: float) -> np.ndarray:
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 0], ids[..., 1], ids[..., 2] = index, np.arange(h)[:, None], np.arange(w)[None, :]
    return ids.reshape(-1, 3)


def inputs(cfg: FluxConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    nt, nr = TARGET[0] * TARGET[1], REFERENCE[0] * REFERENCE[1]
    return {
        "img": rng.standard_normal((1, nt + nr, cfg.in_channels), np.float32),
        "img_ids": np.concatenate([grid_ids(*TARGET, 0), grid_ids(*REFERENCE, 1)]),
        "txt": rng.standard_normal((1, TEXT, cfg.context_in_dim), np.float32),
        "txt_ids": np.zeros((TEXT, 3), np.float32),
        "t": np.full((1,), 0.75, np.float32),
        "y": rng.standard_normal((1, cfg.vec_in_dim), np.float32),
        "guidance": np.full((1,), 2.5, np.float32),
    }


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each fn, timed once per round in turn; a 1 s pause after each (torch's OpenMP
    threads keep spinning for a while after their work and would slow whatever runs next)."""
    for fn in fns.values():
        fn()  # compiled / warm
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            time.sleep(1.0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="Euler steps of the sampling loop")
    p.add_argument("--only-forward", action="store_true", help="ratio 1 alone (no train step, no sampling loop)")
    args = p.parse_args()
    import torch

    from jaxedit.kontext.pipeline import KontextPipeline
    from jaxedit.parallel import sharding as sh
    from jaxedit.train.objective import ObjectiveConfig
    from jaxedit.train.optim import OptimConfig
    from jaxedit.train.step import Trainer

    cfg, x = MEDIUM, inputs(MEDIUM)
    tokens = TEXT + x["img"].shape[1]
    params, diffusers_forward = diffusers_flux(cfg, x)

    model = Flux(cfg)
    bc = lambda a: jnp.broadcast_to(a, (1, *a.shape))  # noqa: E731
    jargs = (jnp.asarray(x["img"]), bc(x["img_ids"]), jnp.asarray(x["txt"]), bc(x["txt_ids"]), jnp.asarray(x["t"]),
             jnp.asarray(x["y"]), jnp.asarray(x["guidance"]))  # fmt: skip
    forward = jax.jit(model.apply)
    forward_xla = jax.jit(Flux(cfg, attention_impl="xla").apply)  # what auto picked on CPU before `rows`
    err = np.linalg.norm(np.asarray(forward({"params": params}, *jargs)) - diffusers_forward().numpy())
    err /= np.linalg.norm(diffusers_forward().numpy())

    # the sampling loop: the pipeline's jitted Euler loop on the target tokens, the reference held fixed
    preset = configs.Preset("medium", "flux-kontext", cfg, presets.get("flux-kontext-tiny").vae, None, None)
    pipe = KontextPipeline(preset, {}, None, dtype=jnp.float32)
    nt = TARGET[0] * TARGET[1]
    timesteps = jnp.linspace(1.0, 0.0, args.steps + 1)
    loop_args = (
        params,
        jargs[0][:, :nt],
        jargs[0][:, nt:],
        jargs[1],
        jargs[2],
        jargs[3],
        jargs[5],
        jargs[6],
        timesteps,
    )

    # the train step: batch 1, full fine-tune, no remat, float32
    trainer = Trainer(cfg, ObjectiveConfig(ref_index=1.0), OptimConfig(), 1000, sh.make_mesh(configs.MeshConfig()),
                      dtype=jnp.float32)  # fmt: skip
    state = trainer.init_state(jax.tree.map(jnp.asarray, params))
    rng = np.random.default_rng(1)
    c = cfg.in_channels // 4
    batch = {"target": rng.standard_normal((1, 1, 2 * TARGET[0], 2 * TARGET[1], c), np.float32),
             "reference": rng.standard_normal((1, 1, 2 * REFERENCE[0], 2 * REFERENCE[1], c), np.float32),
             "txt": rng.standard_normal((1, 1, TEXT, cfg.context_in_dim), np.float32),
             "y": rng.standard_normal((1, 1, cfg.vec_in_dim), np.float32)}  # fmt: skip
    batch = {k: jax.device_put(v, trainer.batch_shardings()[k]) for k, v in batch.items()}

    def train_step():
        nonlocal state
        state, metrics = trainer.step(state, batch, jax.random.key(0))
        jax.block_until_ready((state, metrics))

    a = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048)), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    fns = {
        "matmul 2048^3": lambda: [matmul(a).block_until_ready() for _ in range(5)],
        "jaxedit forward": lambda: forward({"params": params}, *jargs).block_until_ready(),
        "jaxedit forward, xla attention": lambda: forward_xla({"params": params}, *jargs).block_until_ready(),
        "diffusers forward": diffusers_forward,
    }
    if not args.only_forward:
        fns |= {"sampling loop": lambda: pipe.denoise(*loop_args).block_until_ready(), "train step": train_step}
    t = interleaved(fns, args.rounds)
    rate = 5 * 2 * 2048**3 / t["matmul 2048^3"]
    train_flops = 3 * analytic_forward_flops(cfg, tokens)
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); medium config: "
          f"width {cfg.hidden_size}, {cfg.depth}+{cfg.depth_single_blocks} blocks, {tokens} tokens, float32; "
          f"{args.rounds} interleaved rounds; f32 matmul rate this run {rate / 1e9:.0f} GFLOP/s")  # fmt: skip
    print(f"1. forward: jaxedit {t['jaxedit forward'] * 1e3:.0f} ms, diffusers {t['diffusers forward'] * 1e3:.0f} ms: "
          f"jaxedit / diffusers = {t['jaxedit forward'] / t['diffusers forward']:.2f}x (target <= 0.8; outputs "
          f"agree to {err:.1e}); with xla attention {t['jaxedit forward, xla attention'] * 1e3:.0f} ms = "
          f"{t['jaxedit forward, xla attention'] / t['diffusers forward']:.2f}x")  # fmt: skip
    if args.only_forward:
        return
    print(f"2. train step: {t['train step'] * 1e3:.0f} ms, {train_flops / t['train step'] / 1e9:.1f} GFLOP/s of model "
          f"FLOPs = {100 * train_flops / t['train step'] / rate:.0f}% of the matmul rate (target >= 50%)")  # fmt: skip
    print(f"3. sampling loop: {args.steps} steps {t['sampling loop'] * 1e3:.0f} ms, {args.steps} bare forwards "
          f"{args.steps * t['jaxedit forward'] * 1e3:.0f} ms: loop / forwards = "
          f"{t['sampling loop'] / (args.steps * t['jaxedit forward']):.2f}x (target <= 1.05)")  # fmt: skip


if __name__ == "__main__":
    main()
