"""`python -m jaxedit`: a jitted Kontext-shaped forward pass of a small preset (random weights).

Until the editing pipeline lands this is the smoke job: it builds the FLUX DiT from a
preset, runs one forward pass over [text | target | reference] tokens the way Kontext
lays them out, and prints shapes and timings. The weights are random, so the numbers
mean nothing beyond "it runs".
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import configs
from jaxedit.models import Flux


def kontext_ids(h: int, w: int, first: float) -> np.ndarray:
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 0], ids[..., 1], ids[..., 2] = first, np.arange(h)[:, None], np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jaxedit", description=__doc__)
    p.add_argument("--preset", default="flux-kontext-tiny", choices=configs.names())
    p.add_argument("--size", type=int, nargs=2, default=(256, 192), metavar=("W", "H"), help="image size in pixels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=64)
    args = p.parse_args(argv)

    cfg = configs.get(args.preset).transformer
    w, h = (s // 16 for s in args.size)
    ids = np.concatenate([kontext_ids(h, w, 0.0), kontext_ids(h, w, 1.0)])  # target | reference
    b, li, lt = args.batch, ids.shape[0], args.text_tokens
    key = jax.random.key(0)
    inputs = (
        jax.random.normal(key, (b, li, cfg.in_channels)),
        jnp.broadcast_to(ids, (b, li, 3)),
        jax.random.normal(key, (b, lt, cfg.context_in_dim)),
        jnp.zeros((b, lt, 3)),
        jnp.full((b,), 0.7),
        jax.random.normal(key, (b, cfg.vec_in_dim)),
        jnp.full((b,), 2.5) if cfg.guidance_embed else None,
    )
    model = Flux(cfg)
    params = jax.jit(model.init)(key, *inputs)
    # random weights everywhere (init zeroes the gates and the output layer)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    params = tree.unflatten([0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    fwd = jax.jit(model.apply)
    t0 = time.perf_counter()
    out = fwd(params, *inputs).block_until_ready()
    t1 = time.perf_counter()
    out = fwd(params, *inputs).block_until_ready()
    t2 = time.perf_counter()
    n = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"jaxedit smoke job: preset {args.preset} ({n / 1e6:.2f}M params, RANDOM weights), {jax.devices()[0].platform}"
    )
    print(f"  tokens: {lt} text + {li // 2} target + {li // 2} reference, batch {b}")
    print(f"  output {tuple(out.shape)} (target and reference tokens; the pipeline keeps the target part)")
    print(
        f"  compile+first run {t1 - t0:.2f}s, second run {1e3 * (t2 - t1):.1f} ms, "
        f"finite: {bool(jnp.isfinite(out).all())}"
    )


if __name__ == "__main__":
    main()
