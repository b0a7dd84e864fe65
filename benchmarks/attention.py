"""Attention on this CPU, float32, measured side by side in one run, interleaved (each round times every
implementation once; medians over the rounds): jaxedit's implementations (`jaxedit.models.attention`:
`rows`, what `auto` picks on CPU, `xla`, `chunked`) against torch's scaled_dot_product_attention, forward
and forward + backward, with the f32 matmul rate of the same run for scale.

Default shapes: the medium DiT config's joint attention (1 x 1,664 tokens: 128 text + 1,024 target + 512
reference, 12 heads of 64).

    python benchmarks/attention.py [--tokens 1664] [--heads 12] [--head-dim 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import ROOT  # noqa: F401 - puts the repo root on sys.path

from jaxedit.models import attention as A


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1664)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    b, lq, h, d = 1, args.tokens, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((b, lq, h, d)).astype(np.float32) for _ in range(4))
    flops = 4 * b * h * lq * lq * d  # forward: two matmuls; forward + backward counted as 3.5x
    qt, kt, vt = (torch.from_numpy(x).permute(0, 2, 1, 3).contiguous().requires_grad_(True) for x in (q, k, v))
    gt = torch.from_numpy(g).permute(0, 2, 1, 3).contiguous()

    def torch_both():
        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).backward(gt)

    fns = {"torch sdpa": (lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).detach(), torch_both)}
    qj, kj, vj, gj = map(jnp.asarray, (q, k, v, g))
    for impl in ("rows", "xla", "chunked"):
        f = lambda q, k, v, impl=impl: A.dot_product_attention(q, k, v, impl=impl)  # noqa: E731
        fwd = jax.jit(f)
        both = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.vdot(f(q, k, v), gj), argnums=(0, 1, 2)))
        fns[f"jaxedit {impl}"] = (
            lambda fwd=fwd: jax.block_until_ready(fwd(qj, kj, vj)),
            lambda both=both: jax.block_until_ready(both(qj, kj, vj)),
        )
    a = jnp.asarray(rng.standard_normal((2048, 2048)).astype(np.float32))
    mm = jax.jit(lambda a: a @ a)
    fns["matmul 2048^3"] = (lambda: mm(a).block_until_ready(), lambda: None)
    ref = np.asarray(fns["torch sdpa"][0]()).transpose(0, 2, 1, 3)
    for name, (fwd, both) in fns.items():
        fwd(), both()
        if name.startswith("jaxedit"):
            print(f"{name}: max |out - torch| {np.abs(np.asarray(fwd()) - ref).max():.1e}")
    times = {name: ([], []) for name in fns}
    for _ in range(args.rounds):
        for name, pair in fns.items():
            for i, fn in enumerate(pair):
                t0 = time.perf_counter()
                fn()
                times[name][i].append(time.perf_counter() - t0)
                time.sleep(1.0)  # torch's OpenMP threads spin a while after their work: not into the next timing
    rate = 2 * 2048**3 / statistics.median(times["matmul 2048^3"][0]) / 1e9
    tf, tb = (statistics.median(times["torch sdpa"][i]) for i in (0, 1))
    print(f"\n{b} x {lq} tokens, {h} heads of {d}, float32, {args.rounds} interleaved rounds; "
          f"f32 matmul rate this run: {rate:.0f} GFLOP/s")  # fmt: skip
    for name, (f, bw) in times.items():
        if name.startswith("matmul"):
            continue
        f, bw = statistics.median(f), statistics.median(bw)
        fwd = f"forward {f * 1e3:7.1f} ms ({flops / f / 1e9:5.1f} GFLOP/s, {f / tf:4.2f}x torch)"
        both = f"forward + backward {bw * 1e3:7.1f} ms ({3.5 * flops / bw / 1e9:5.1f} GFLOP/s, {bw / tb:4.2f}x torch)"
        print(f"{name:18s} {fwd}   {both}")


if __name__ == "__main__":
    main()
