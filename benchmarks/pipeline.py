"""Kontext pipeline benchmark, side by side in one run on this machine (float32).

- time per denoising step: jaxedit's jitted loop vs diffusers' FluxKontextPipeline, both
  on the same tiny random model (`flux-kontext-tiny`), from (time at 2N steps - time at N
  steps) / N so that encode/decode and text encoding cancel out;
- compile time on a cold persistent cache and time to first image with a warm one (two
  fresh processes sharing a new cache directory).

    python benchmarks/pipeline.py [--size 128] [--steps 8] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, timed  # benchmarks/common.py (puts the repo root on sys.path)


def first_image(model: str, size: int, cache: str) -> dict:
    """Fresh process: load the model folder, edit one image, report times."""
    code = f"""
import json, time
t0 = time.perf_counter()
import numpy as np
from PIL import Image
from jaxedit.kontext.pipeline import KontextPipeline, enable_compilation_cache
import jax.numpy as jnp
enable_compilation_cache({cache!r})
pipe = KontextPipeline.load({model!r}, dtype=jnp.float32, auto_resize=False, compile_cache=False)
t1 = time.perf_counter()
img = Image.fromarray(np.zeros(({size}, {size}, 3), np.uint8))
pipe([img], ["make it red"], [0], steps=4)
t2 = time.perf_counter()
print(json.dumps(dict(load=t1 - t0, first_image=t2 - t1)))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="square image side (px)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()

    import jax.numpy as jnp
    import numpy as np
    import torch
    from PIL import Image

    from checkpoints_convert.__main__ import main as convert_cli
    from jaxedit.kontext.pipeline import KontextPipeline
    from references.models import kontext_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="jaxedit-bench-"))
    ref = kontext_pipeline(tmp)
    ref.set_progress_bar_config(disable=True)
    assert convert_cli(["pipeline", str(tmp / "diffusers"), str(tmp / "jax"), "--preset", "flux-kontext-tiny"]) == 0
    ours = KontextPipeline.load(tmp / "jax", dtype=jnp.float32, auto_resize=False, compile_cache=False)
    s, b = args.size, args.batch
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (s, s, 3), dtype=np.uint8)) for i in range(b)]
    prompts = ["make the cat wear a blue hat"] * b

    def run_ours(n):
        return ours(imgs, prompts, list(range(b)), steps=n, guidance=3.5, output="latents")

    def run_ref(n):
        with torch.no_grad():
            ref(image=imgs, prompt=prompts, num_inference_steps=n, guidance_scale=3.5, height=s, width=s,
                max_area=s * s, _auto_resize=False, max_sequence_length=64, output_type="latent")  # fmt: skip

    n = args.steps
    for k in (n, 2 * n):
        run_ours(k)  # compile both loop lengths
    t_ours = (timed(lambda: run_ours(2 * n)) - timed(lambda: run_ours(n))) / n
    t_ref = (timed(lambda: run_ref(2 * n)) - timed(lambda: run_ref(n))) / n
    print(f"jax on cpu; torch {torch.__version__} ({torch.get_num_threads()} threads); flux-kontext-tiny, "
          f"{s}x{s} edit, batch {b}, float32")  # fmt: skip
    print(f"per denoising step: jaxedit {1e3 * t_ours:.1f} ms, diffusers {1e3 * t_ref:.1f} ms, "
          f"diffusers/jaxedit = {t_ref / t_ours:.2f}x")  # fmt: skip

    cache = str(tmp / "xla-cache")
    cold = first_image(str(tmp / "jax"), s, cache)
    warm = first_image(str(tmp / "jax"), s, cache)
    print(f"first image (4 steps, fresh process): cold cache {cold['first_image']:.1f}s (compile included), "
          f"warm cache {warm['first_image']:.1f}s; cold/warm = {cold['first_image'] / warm['first_image']:.1f}x "
          f"(model load {warm['load']:.1f}s)")  # fmt: skip


if __name__ == "__main__":
    main()
