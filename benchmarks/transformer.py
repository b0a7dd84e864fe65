"""FLUX DiT benchmark, measured side by side in one run on this machine.

1. Compile time of the full-depth (19 + 38 blocks) model at a small width: layers under
   `nn.scan` versus the unrolled loop (same parameters), and the ratio.
2. Forward time of jaxedit (jit, scan) versus diffusers' FluxTransformer2DModel at the
   same config, float32, same inputs (Kontext-shaped: text | target | reference), ratio.

    python benchmarks/transformer.py [--width 256] [--image 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import diffusers_flux, timed  # benchmarks/common.py

from jaxedit.configs import FluxConfig
from jaxedit.models import Flux


def kontext_inputs(cfg: FluxConfig, batch: int, image: int, text_tokens: int, seed: int = 0):
    g = image // 16
    grid = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(-1, 2)
    ids = np.concatenate([np.pad(grid, ((0, 0), (1, 0))), np.pad(grid, ((0, 0), (1, 0)), constant_values=1)])
    ids[: g * g, 0] = 0
    rng = np.random.default_rng(seed)
    return dict(
        img=rng.standard_normal((batch, ids.shape[0], cfg.in_channels), np.float32),
        img_ids=ids.astype(np.float32),
        txt=rng.standard_normal((batch, text_tokens, cfg.context_in_dim), np.float32),
        txt_ids=np.zeros((text_tokens, 3), np.float32),
        t=np.full((batch,), 0.7, np.float32),
        y=rng.standard_normal((batch, cfg.vec_in_dim), np.float32),
        guidance=np.full((batch,), 2.5, np.float32),
    )


def jax_args(x):
    b = x["img"].shape[0]
    bc = lambda a: jnp.broadcast_to(a, (b, *a.shape))  # noqa: E731
    return (x["img"], bc(x["img_ids"]), x["txt"], bc(x["txt_ids"]), x["t"], x["y"], x["guidance"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256, help="hidden size (heads of 64)")
    p.add_argument("--image", type=int, default=256, help="image side in pixels (target and reference)")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import torch

    heads = args.width // 64
    cfg = FluxConfig(hidden_size=args.width, num_heads=heads, axes_dim=(8, 28, 28), context_in_dim=256, vec_in_dim=128)
    x = kontext_inputs(cfg, args.batch, args.image, args.text_tokens)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"config: width {cfg.hidden_size}, {cfg.num_heads} heads, {cfg.depth}+{cfg.depth_single_blocks} blocks; "
        f"tokens {args.text_tokens} text + 2 x {(args.image // 16) ** 2} image, batch {args.batch}, float32"
    )

    # 1. compile time, scan vs unrolled
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
        jax.eval_shape(Flux(cfg).init, jax.random.key(0), *jax_args(x)),
    )
    compile_s = {}
    for scan in (True, False):
        fn = jax.jit(Flux(cfg, scan_layers=scan).apply)
        t0 = time.perf_counter()
        fn.lower(abstract, *jax_args(x)).compile()
        compile_s[scan] = time.perf_counter() - t0
    print(
        f"compile (19+38 blocks): scan {compile_s[True]:.1f}s, unrolled {compile_s[False]:.1f}s, "
        f"unrolled/scan = {compile_s[False] / compile_s[True]:.1f}x"
    )

    # 2. forward time, ours vs diffusers, same weights
    params, run_ref = diffusers_flux(cfg, x)  # diffusers' model, every parameter random, converted

    fwd = jax.jit(Flux(cfg).apply)
    jargs = [jnp.asarray(a) for a in jax_args(x)]
    ours_out = fwd({"params": params}, *jargs).block_until_ready()  # compile
    ref_out = run_ref()
    err = np.linalg.norm(np.asarray(ours_out) - ref_out.numpy()) / np.linalg.norm(ref_out.numpy())
    t_ours = timed(lambda: fwd({"params": params}, *jargs).block_until_ready(), args.repeats)
    t_ref = timed(run_ref, args.repeats)
    print(
        f"forward: jaxedit {1e3 * t_ours:.0f} ms, diffusers {1e3 * t_ref:.0f} ms, "
        f"diffusers/jaxedit = {t_ref / t_ours:.2f}x (median of {args.repeats}; outputs agree to {err:.1e})"
    )


if __name__ == "__main__":
    main()
