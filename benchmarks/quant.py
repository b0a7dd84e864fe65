"""Quantised weights on this CPU: the DiT forward with int8 / fp8 weights (`jaxedit.quant`) against bfloat16
and float32, measured side by side in one run, interleaved (each round times every variant once; medians
over the rounds), with each variant's weight bytes and its output's error against float32.

Medium config: width 768, 12 heads, 4 double + 8 single blocks, 128 text + 1,024 target + 1,024 reference
tokens, batch 1; random weights (N(0, 0.02)).

    python benchmarks/quant.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import rel  # benchmarks/common.py
from transformer import jax_args, kontext_inputs

from jaxedit import quant
from jaxedit.configs import FluxConfig
from jaxedit.models import Flux, flux

MEDIUM = FluxConfig(
    in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=768, num_heads=12, depth=4,
    depth_single_blocks=8, axes_dim=(16, 24, 24),
)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    cfg = MEDIUM
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.02, jnp.float32), flux.abstract_params(cfg)
    )
    x = kontext_inputs(cfg, 1, 512, 128)  # 32 x 32 = 1,024 target tokens + a reference as large
    x["t"][:] = 0.75  # exact in bfloat16 (the model casts t to its dtype): the errors are arithmetic alone
    inputs = jax_args(x)
    q = {m: quant.quantize_params("transformer", params, m) for m in quant.MODES}
    variants = {  # name: (compute dtype, weights)
        "float32": (jnp.float32, params),
        "bfloat16": (jnp.bfloat16, quant.cast(params, jnp.bfloat16)),
        "int8 (bf16 compute)": (jnp.bfloat16, quant.cast(q["int8"], jnp.bfloat16)),
        "fp8 (bf16 compute)": (jnp.bfloat16, quant.cast(q["fp8"], jnp.bfloat16)),
        "int8 (f32 compute)": (jnp.float32, q["int8"]),
    }
    fns, outs = {}, {}
    for name, (dtype, tree) in variants.items():
        model = Flux(cfg, dtype=dtype, param_dtype=dtype)
        t0 = time.perf_counter()
        fns[name] = jax.jit(model.apply).lower({"params": tree}, *inputs).compile()
        outs[name] = np.asarray(fns[name]({"params": tree}, *inputs), np.float32)
        print(f"compiled {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (_, tree) in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]({"params": tree}, *inputs))
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["float32"])
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    print(f"\nDiT forward, medium config ({inputs[0].shape[1] + inputs[2].shape[1]} tokens), {args.rounds} "
          f"interleaved rounds, {jax.devices()[0].platform}:")  # fmt: skip
    print(f"{'weights':22s} {'weight MB':>10s} {'forward s':>10s} {'vs f32':>8s} {'rel. err vs f32':>16s}")
    for name, (_, tree) in variants.items():
        t = statistics.median(times[name])
        err = rel(outs[name], outs["float32"])
        print(f"{name:22s} {nbytes(tree) / 1e6:10.1f} {t:10.3f} {t / base:7.2f}x {err:16.2e}")


if __name__ == "__main__":
    main()
