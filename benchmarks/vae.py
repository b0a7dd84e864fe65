"""FLUX VAE benchmark at full width (AutoEncoderConfig()), measured side by side in one run.

1. Peak memory of a 1024x1024 decode / encode, untiled and tiled, from XLA's buffer
   assignment (`jit(...).lower(abstract).compile().memory_analysis()`; nothing allocated).
2. Encode and decode time of jaxedit (jit) versus diffusers' AutoencoderKL with the FLUX
   configuration, float32, same random weights (save_pretrained + load_vae), same inputs.
3. Tiled decode at the benchmark size: error against the untiled decode, next to diffusers'
   own tiling (`enable_tiling`) at the same tile size and overlap.

    python benchmarks/vae.py [--image 256] [--batch 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import rel  # benchmarks/common.py (also puts the repo root on sys.path)

from jaxedit.configs import AutoEncoderConfig
from jaxedit.models.autoencoder import AutoEncoder, abstract_params, decode_tiled, encode_tiled

GiB = 2**30


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median times of two functions, run alternately (fair on a machine with changing load)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, ts in zip((fn_a, fn_b), times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def memory(cfg: AutoEncoderConfig, size: int) -> None:
    m, params = AutoEncoder(cfg), abstract_params(cfg)
    z = jax.ShapeDtypeStruct((1, size // 8, size // 8, cfg.z_channels), jnp.float32)
    x = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), jnp.float32)
    cases = [
        ("decode", lambda p, z: m.apply({"params": p}, z, method="decode"), z),
        ("decode_tiled (tile 64, overlap 16 latents)", functools.partial(decode_tiled, m, tile=64, overlap=16), z),
        ("encode", lambda p, x: m.apply({"params": p}, x, method="encode"), x),
        ("encode_tiled (tile 512, overlap 128 px)", functools.partial(encode_tiled, m, tile=512, overlap=128), x),
    ]
    for name, fn, arg in cases:
        ma = jax.jit(fn).lower(params, arg).compile().memory_analysis()
        print(
            f"memory {size}x{size} {name}: temp {ma.temp_size_in_bytes / GiB:.2f} GiB "
            f"+ arguments {ma.argument_size_in_bytes / GiB:.2f} GiB (weights, input)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=int, default=256, help="image side in pixels (multiple of 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-size", type=int, default=1024, help="image side for the memory figures")
    args = p.parse_args()

    import diffusers
    import torch

    from checkpoints_convert import load_vae

    cfg = AutoEncoderConfig()
    torch.manual_seed(0)  # diffusers' default initialisation draws the (random) weights
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); diffusers {diffusers.__version__}"
    )
    print(f"config: full-width FLUX VAE (ch {cfg.ch}, ch_mult {cfg.ch_mult}, {cfg.num_res_blocks} res blocks), float32")

    # 1. memory
    memory(cfg, args.memory_size)

    # 2. time, ours vs diffusers, same weights
    from references.models import autoencoder as reference_model  # the parity tests' diffusers VAE, all random

    ref = reference_model(cfg)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        params = load_vae(d, cfg)

    rng = np.random.default_rng(0)
    lo = rng.uniform(-1, 1, (args.batch, args.image // 32, args.image // 32, 3)).astype(np.float32)
    x = np.asarray(jax.image.resize(lo, (args.batch, args.image, args.image, 3), "bilinear"))  # smooth image
    x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    m = AutoEncoder(cfg)
    enc = jax.jit(lambda p, x: m.apply({"params": p}, x, method="encode"))
    dec = jax.jit(lambda p, z: m.apply({"params": p}, z, method="decode"))

    def ref_enc():
        with torch.no_grad():
            return (ref.encode(x_t).latent_dist.mean - cfg.shift_factor) * cfg.scale_factor

    z = enc(params, x).block_until_ready()  # compile
    z_t = ref_enc()
    z_err = rel(z, z_t.numpy().transpose(0, 2, 3, 1))

    def ref_dec():
        with torch.no_grad():
            return ref.decode(z_t / cfg.scale_factor + cfg.shift_factor).sample

    out = dec(params, z).block_until_ready()  # compile
    out_ref = ref_dec().numpy().transpose(0, 2, 3, 1)
    x_err = rel(out, out_ref)

    for name, ours_fn, ref_fn, err in [
        ("encode", lambda: enc(params, x).block_until_ready(), ref_enc, z_err),
        ("decode", lambda: dec(params, z).block_until_ready(), ref_dec, x_err),
    ]:
        t_ours, t_ref = timed_pair(ours_fn, ref_fn, args.repeats)
        print(
            f"{name} {args.batch}x{args.image}x{args.image}: jaxedit {1e3 * t_ours:.0f} ms, diffusers "
            f"{1e3 * t_ref:.0f} ms, diffusers/jaxedit = {t_ref / t_ours:.2f}x "
            f"(median of {args.repeats}, run alternately; outputs agree to {err:.1e})"
        )

    # 3. tiled decode error at this size (tiles of half the side, overlap a quarter of a tile)
    tile = args.image // 8 // 2
    overlap = tile // 4
    tiled = jax.jit(functools.partial(decode_tiled, m, tile=tile, overlap=overlap))(params, z)
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = tile, 8 * tile, overlap / tile
    ref_tiled = ref_dec().numpy().transpose(0, 2, 3, 1)
    print(
        f"decode_tiled (tile {tile}, overlap {overlap} latents) rel err vs untiled: jaxedit {rel(tiled, out):.2e}, "
        f"diffusers enable_tiling {rel(ref_tiled, out_ref):.2e}"
    )


if __name__ == "__main__":
    main()
