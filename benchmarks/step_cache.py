"""Step caching on the tiny random models of the three families (`jaxedit.step_cache`, issue #40), side by side in
one run: for first-block-cache and TeaCache thresholds, the steps the batch skipped, the final latents' difference to
the uncached loop (mean |cached - uncached| / mean |uncached|, max |cached - uncached|), the median wall time of an
edit after compilation, and how many programs the jitted loop compiled (one per signal: thresholds are run-time
arguments).

Random models: their first block moves a lot from step to step, so these thresholds say nothing about a trained
model's; the figures check the machinery (threshold 0 = uncached, skips cost less), not the quality.

    python benchmarks/step_cache.py [--steps 8] [--fulldepth] [--only "FLUX.1 Kontext"]
"""

from __future__ import annotations

import argparse
import tempfile

import jax.numpy as jnp
import numpy as np
from common import timed  # benchmarks/common.py
from PIL import Image

from jaxedit import presets
from jaxedit.random_model import make_random_model, random_params

THRESHOLDS = {"fbc": (0, 0.2, 0.5, 1.0, 1e9), "tea": (0, 0.1, 0.25, 0.4, 0.8, 1e9)}
W = H = 32


def pipelines(fulldepth: bool, tmp: str):
    """(family title, pipeline, call keywords) of each family's tiny model, float32."""
    from jaxedit.kontext.pipeline import KontextPipeline
    from jaxedit.qwen_image import pipeline as qp
    from jaxedit.step1x.pipeline import Step1XEditPipeline

    rng = np.random.default_rng(0)
    name = "flux-kontext-tiny-fulldepth" if fulldepth else "flux-kontext-tiny"
    kontext = KontextPipeline.load(make_random_model(f"{tmp}/k", name), dtype=jnp.float32, compile_cache=False)
    yield "FLUX.1 Kontext", kontext, {}
    preset = presets.get("step1x-edit-tiny")
    step1x = Step1XEditPipeline(preset, random_params(preset), None, dtype=jnp.float32, size_level=32)
    llm = (rng.standard_normal((4, 6, preset.connector.in_channels)).astype(np.float32), np.ones((4, 6), np.int32))
    yield "Step1X-Edit (CFG)", step1x, {"llm": llm}
    qp.VAE_AREA = W * H
    preset = presets.get("qwen-image-edit-tiny")
    qwen = qp.QwenImageEditPipeline(preset, random_params(preset), None, dtype=jnp.float32)
    d = preset.transformer.joint_attention_dim
    emb = [(rng.standard_normal((2, 5, d)).astype(np.float32), np.ones((2, 5), np.int32)) for _ in range(2)]
    yield "Qwen-Image-Edit (true CFG 3)", qwen, {"llm": emb[0], "negative_llm": emb[1], "true_cfg_scale": 3.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--fulldepth", action="store_true", help="FLUX.1 Kontext at full depth (19 + 38 blocks)")
    p.add_argument("--only", default=None, help="the families whose title contains this text")
    args = p.parse_args()
    rng = np.random.default_rng(3)
    ims = [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(2)]
    print("| model | cache | steps skipped (batch) | rel. difference | max abs difference | edit time | programs |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for title, pipe, kw in pipelines(args.fulldepth, tmp):
            if args.only and args.only not in title:
                continue
            images = [[im] for im in ims] if "negative_llm" in kw else ims

            def run(cache=None, pipe=pipe, kw=kw, images=images):
                return pipe(images, ["make it red", "add a hat"], [0, 1], steps=args.steps, width=W, height=H,
                            output="latents", cache=cache, **kw)  # fmt: skip

            base = run()
            t = timed(run)
            print(f"| {title} | off | - | - | - | {t * 1e3:.0f} ms | 1 |")
            for signal, thresholds in THRESHOLDS.items():
                for th in thresholds:
                    cache = f"{signal}:{th:g}"
                    out = run(cache)
                    skipped = int(pipe.last_cache_skips.all(axis=1).sum())
                    diff = np.abs(out - base)
                    t = timed(lambda c=cache: run(c))
                    print(f"| {title} | {cache} | {skipped}/{args.steps} | {diff.mean() / np.abs(base).mean():.2e} | "
                          f"{diff.max():.2e} | {t * 1e3:.0f} ms | {pipe.denoise._cache_size()} |")  # fmt: skip


if __name__ == "__main__":
    main()
