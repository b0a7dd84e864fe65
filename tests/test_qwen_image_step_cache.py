"""Step caching for Qwen-Image-Edit (`jaxedit.step_cache` on `QwenImageTransformer.first_blocks / rest_blocks`,
issue #40) on the tiny random model, with and without true CFG: the split DiT equals the whole one, a threshold
of zero (first-block cache and TeaCache) is the uncached loop, a cached step really skips the blocks, a calibrated
schedule replays the first-block cache's decisions, a large TeaCache threshold reuses every step but the first and
the last, and another threshold runs the same compiled program."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxedit import presets, step_cache
from jaxedit.models.qwen_image import QwenImageTransformer
from jaxedit.qwen_image import pipeline as ours
from jaxedit.random_model import random_params

W = H = 32  # 2x2 target tokens, one 32x32 reference (the VAE's area made small)
STEPS, LT = 8, 5
PROMPTS, SEEDS = ["make it red", "add a hat"], [0, 1]


def rel(a, b):
    return float(np.abs(a - b).mean() / np.abs(b).mean())


@pytest.fixture(scope="module")
def pipe():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ours, "VAE_AREA", W * H)
        preset = presets.get("qwen-image-edit-tiny")
        yield ours.QwenImageEditPipeline(preset, random_params(preset), None, dtype=jnp.float32)


def conditioning(seed=0):
    rng = np.random.default_rng(seed)
    d = presets.get("qwen-image-edit-tiny").transformer.joint_attention_dim
    emb = rng.standard_normal((2, LT, d)).astype(np.float32)
    return emb, np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)


def images():
    rng = np.random.default_rng(3)
    return [[Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))] for _ in PROMPTS]


def run(pipe, n=2, cfg=False, **kw):
    llm = tuple(a[:n] for a in conditioning())
    extra = dict(negative_llm=tuple(a[:n] for a in conditioning(1)), true_cfg_scale=3.0) if cfg else {}
    extra = extra or dict(true_cfg_scale=1.0)
    return pipe(images()[:n], PROMPTS[:n], SEEDS[:n], steps=STEPS, width=W, height=H, output="latents", llm=llm,
                **extra, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def uncached(pipe):
    return {cfg: run(pipe, cfg=cfg) for cfg in (False, True)}


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_split_dit_is_the_dit(pipe, zero_cond_t):
    """embed -> first_blocks -> rest_blocks -> finish equals the whole call (same parameters, masked text, two
    images; 2511's zero_cond_t too: the same parameters)."""
    cfg = dataclasses.replace(pipe.preset.transformer, zero_cond_t=zero_cond_t)
    model, params = QwenImageTransformer(cfg), pipe.params["transformer"]
    rng = np.random.default_rng(0)
    shapes = ((1, 2, 3), (1, 2, 2))
    img = jnp.asarray(rng.standard_normal((2, 10, cfg.in_channels)), jnp.float32)
    txt, mask = conditioning()
    args = (img, jnp.asarray(txt), jnp.asarray(mask), jnp.asarray([0.7, 0.3]), shapes)

    @jax.jit
    def both(params, img, txt, mask, t):
        parts = step_cache.dit_parts(model, params)
        img0, txt0, vec, ctx = parts.embed(img, txt, mask, t, shapes)
        out = parts.finish(parts.rest(*parts.first(img0, txt0, vec, ctx), vec, ctx), vec)
        whole = model.apply({"params": params}, img, txt, mask, t, shapes)
        return out, whole, parts.modulated(img0, vec, ctx)

    out, whole, modulated = both(params, *args[:4])
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-6)
    assert modulated.shape == img.shape[:2] + (cfg.hidden_size,)


@pytest.mark.parametrize("cfg", [False, True])
def test_threshold_zero_is_uncached(pipe, uncached, cfg):
    for cache in ("fbc:0", "tea:0"):
        cached = run(pipe, cfg=cfg, cache=cache)
        assert not pipe.last_cache_skips.any() and pipe.last_cache_skips.shape == (STEPS, 2)
        # ulps apart under the tests' LLVM flags (tests/conftest.py), as FLUX's and Step1X's
        np.testing.assert_allclose(cached, uncached[cfg], rtol=0, atol=2e-6)


def test_cached_step_skips_the_blocks(pipe, monkeypatch):
    """A debug callback inside `rest_blocks` counts how often the blocks after the first really run (true CFG:
    two transformer calls a step)."""
    calls = []
    rest, first = QwenImageTransformer.rest_blocks, QwenImageTransformer.first_blocks

    def counted_rest(self, *a, **kw):
        jax.debug.callback(lambda: calls.append("rest"))
        return rest(self, *a, **kw)

    def counted_first(self, *a, **kw):
        jax.debug.callback(lambda: calls.append("first"))
        return first(self, *a, **kw)

    monkeypatch.setattr(QwenImageTransformer, "rest_blocks", counted_rest)
    monkeypatch.setattr(QwenImageTransformer, "first_blocks", counted_first)
    skips = (False, True, False, True, True, False, True, False)
    run(pipe, cfg=True, cache=step_cache.CacheSpec(skips=skips))
    jax.effects_barrier()
    assert calls.count("first") == 2 * STEPS
    assert calls.count("rest") == 2 * (STEPS - sum(skips))
    np.testing.assert_array_equal(pipe.last_cache_skips, np.array(skips)[:, None].repeat(2, axis=1))


def test_tea_thresholds_skip_and_run_one_program(pipe, uncached):
    """TeaCache: a large threshold reuses every step but the first and the last (TeaCache's rule); thresholds are
    run-time arguments: all of them run one compiled program."""
    rows = []
    run(pipe, cfg=True, cache="tea:0.3")
    size = pipe.denoise._cache_size()
    for t in (0.05, 0.1, 0.2, 0.5, 1e9):
        out = run(pipe, cfg=True, cache=f"tea:{t:g}")
        skips = pipe.last_cache_skips
        assert np.isfinite(out).all() and not skips[0].any() and not skips[-1].any()
        rows.append((t, int(skips.all(axis=1).sum()), rel(out, uncached[True])))
        print(
            f"Qwen-Image tea:{t:g}: steps skipped by the batch {rows[-1][1]}/{STEPS}, per item "
            f"{skips.sum(axis=0).tolist()}, mean |cached - uncached| / mean |uncached| {rows[-1][2]:.2e}"
        )
    assert pipe.denoise._cache_size() == size  # no compilation for the other thresholds
    assert rows[-1][1] == STEPS - 2 and rows[-1][2] > 1e-3
    assert rows[0][1] == 0 and any(0 < r[1] < STEPS - 2 for r in rows)  # (the tiny random model's first block moves
    # a lot: its thresholds say nothing about a trained model's)
    out = run(pipe, cfg=True, cache="fbc:1e9")
    assert pipe.last_cache_skips[1:].all() and np.isfinite(out).all()


def test_schedule_replays_first_block_cache(pipe):
    llm = conditioning()
    for i in range(2):  # each item alone: FBC, then its own decisions replayed as a schedule
        kw = dict(
            steps=STEPS, width=W, height=H, output="latents", llm=tuple(a[i : i + 1] for a in llm), true_cfg_scale=1.0
        )
        fbc = pipe([images()[i]], [PROMPTS[i]], [SEEDS[i]], cache="fbc:1", **kw)
        own = tuple(bool(s) for s in pipe.last_cache_skips[:, 0])
        assert 0 < sum(own) < STEPS - 1
        print(f"item {i} at fbc:1 reuses steps {''.join('x' if s else '.' for s in own)}")
        replay = pipe([images()[i]], [PROMPTS[i]], [SEEDS[i]], cache=step_cache.CacheSpec(skips=own), **kw)
        np.testing.assert_array_equal(pipe.last_cache_skips[:, 0], own)
        np.testing.assert_allclose(replay, fbc, rtol=0, atol=1e-6)
    data = step_cache.calibrate(pipe, [images()[0]], PROMPTS[:1], SEEDS[:1], 1.0, steps=STEPS, width=W, height=H,
                                llm=tuple(a[:1] for a in llm), true_cfg_scale=1.0)  # fmt: skip
    assert len(data["skips"]) == STEPS and not data["skips"][0]
