"""Step caching in the jitted sampling loop (`jaxedit.step_cache`, issue #40 item 1) on tiny random models: a
threshold of zero is exactly the uncached loop, a cached step really skips the blocks, a large threshold skips
steps and stays finite, a calibrated static schedule replays the first-block cache's decisions exactly, and
Step1X-Edit runs through the same split DiT."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxedit import presets, step_cache
from jaxedit.kontext.pipeline import KontextPipeline
from jaxedit.models.flux import Flux
from jaxedit.random_model import make_random_model, random_params

W = H = 32  # 2x2 target tokens, one reference of the same size
STEPS = 8
PROMPTS, SEEDS = ["make it red", "add a hat"], [0, 1]


def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in PROMPTS]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_random_model(tmp_path_factory.mktemp("cache") / "model", "flux-kontext-tiny")
    return KontextPipeline.load(folder, dtype=jnp.float32, compile_cache=False)


def run(pipe, n=2, **kw):
    return pipe(images()[:n], PROMPTS[:n], SEEDS[:n], steps=STEPS, width=W, height=H, output="latents", **kw)


def rel(a, b):
    return float(np.abs(a - b).mean() / np.abs(b).mean())


@pytest.fixture(scope="module")
def uncached(pipe):
    return run(pipe)


def test_threshold_zero_is_uncached(pipe, uncached):
    """Under the tests' XLA flags (LLVM at opt level 0, tests/conftest.py) the split DiT's code rounds a few
    values one ulp away from the one-scan DiT's; `test_threshold_zero_is_bitwise_uncached` checks them equal
    under XLA's default code generation, what users run."""
    cached = run(pipe, cache="fbc:0")
    assert not pipe.last_cache_skips.any() and pipe.last_cache_skips.shape == (STEPS, 2)
    np.testing.assert_allclose(cached, uncached, rtol=0, atol=1e-6)
    cfg = dict(true_cfg_scale=2.0, negative_prompt="blurry")  # true CFG: both calls cached
    np.testing.assert_allclose(run(pipe, cache="fbc:0", **cfg), run(pipe, **cfg), rtol=0, atol=1e-6)


BITWISE = """
import sys
import jax.numpy as jnp, numpy as np
from PIL import Image
from jaxedit.kontext.pipeline import KontextPipeline
from jaxedit.random_model import make_random_model
pipe = KontextPipeline.load(make_random_model(sys.argv[1], "flux-kontext-tiny"), dtype=jnp.float32,
                            compile_cache=False)
rng = np.random.default_rng(3)
ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
run = lambda **c: pipe(ims, ["make it red", "add a hat"], [0, 1], steps=8, width=32, height=32, output="latents",
                       **c)
np.testing.assert_array_equal(run(cache="fbc:0"), run())
assert not pipe.last_cache_skips.any()
print("bitwise equal")
"""


@pytest.mark.slow  # a fresh process compiling both loops: ~100 s; the in-process test checks 1e-6 in the default run
def test_threshold_zero_is_bitwise_uncached(tmp_path):
    """fbc:0 gives exactly the uncached final latents under XLA's default code generation: a subprocess without
    the tests' LLVM flags."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", BITWISE, str(tmp_path / "model")], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bitwise equal" in out.stdout


def test_thresholds_skip_steps(pipe, uncached):
    rows = []
    for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1e9):
        out = run(pipe, cache=f"fbc:{t:g}")
        skips = pipe.last_cache_skips
        assert np.isfinite(out).all() and not skips[0].any()
        rows.append((t, int(skips.all(axis=1).sum()), skips.sum(axis=0).tolist(), rel(out, uncached)))
        print(f"fbc:{t:g}: steps skipped by the batch {rows[-1][1]}/{STEPS}, per item {rows[-1][2]}, "
              f"mean |cached - uncached| / mean |uncached| {rows[-1][3]:.2e}")  # fmt: skip
    assert rows[-1][1] == STEPS - 1  # a huge threshold reuses every step after the first
    assert rows[-1][3] > 1e-3
    assert any(0 < r[1] < STEPS - 1 for r in rows)  # some threshold skips some steps, not all
    pipe.set_cache("fbc:1e9")  # the pipeline's default, overridden per call
    try:
        np.testing.assert_array_equal(run(pipe, cache="off"), uncached)
        np.testing.assert_array_equal(run(pipe), run(pipe, cache="fbc:1e9"))
    finally:
        pipe.set_cache(None)


def test_tea_cache(pipe, uncached):
    """TeaCache's signal (the first block's modulated input, FLUX.1-dev's rescaling polynomial, accumulated):
    threshold 0 is the uncached loop; a large one reuses every step but the first and the last; thresholds are
    run-time arguments of one compiled program."""
    np.testing.assert_allclose(run(pipe, cache="tea:0"), uncached, rtol=0, atol=1e-6)
    assert not pipe.last_cache_skips.any()
    size = pipe.denoise._cache_size()
    for t in (0.25, 0.4, 0.6, 0.8, 2, 1e9):
        out = run(pipe, cache=f"tea:{t:g}")
        skips = pipe.last_cache_skips
        assert np.isfinite(out).all() and not skips[0].any() and not skips[-1].any()
        print(f"tea:{t:g}: steps skipped by the batch {int(skips.all(axis=1).sum())}/{STEPS}, per item "
              f"{skips.sum(axis=0).tolist()}, mean |cached - uncached| / mean |uncached| {rel(out, uncached):.2e}, "
              f"max |cached - uncached| {np.abs(out - uncached).max():.2e}")  # fmt: skip
    assert pipe.denoise._cache_size() == size  # the other thresholds: no compilation
    assert skips[1:-1].all() and rel(out, uncached) > 1e-3


def test_threshold_is_a_run_time_argument(pipe):
    """Two first-block-cache thresholds run one compiled program; a schedule compiles its own."""
    run(pipe, cache="fbc:0.05")
    size = pipe.denoise._cache_size()
    run(pipe, cache="fbc:0.7")
    assert pipe.denoise._cache_size() == size
    run(pipe, cache=step_cache.CacheSpec(skips=(False, True) * (STEPS // 2)))
    assert pipe.denoise._cache_size() == size + 1


def test_cached_step_skips_the_blocks(pipe, monkeypatch):
    """A debug callback inside `rest_blocks` counts how often the blocks after the first really run."""
    calls = []
    rest, first = Flux.rest_blocks, Flux.first_blocks

    def counted_rest(self, img, *a, **kw):
        jax.debug.callback(lambda: calls.append("rest"))
        return rest(self, img, *a, **kw)

    def counted_first(self, img, *a, **kw):
        jax.debug.callback(lambda: calls.append("first"))
        return first(self, img, *a, **kw)

    monkeypatch.setattr(Flux, "rest_blocks", counted_rest)
    monkeypatch.setattr(Flux, "first_blocks", counted_first)
    skips = (False, True, True, False, True, False, True, True)  # a schedule no other test compiles
    run(pipe, cache=step_cache.CacheSpec(skips=skips))
    jax.effects_barrier()
    assert calls.count("first") == STEPS
    assert calls.count("rest") == STEPS - sum(skips)
    np.testing.assert_array_equal(pipe.last_cache_skips, np.array(skips)[:, None].repeat(2, axis=1))


def test_schedule_replays_first_block_cache(pipe, uncached, tmp_path):
    path = tmp_path / "schedule.json"
    # the tiny random model's first block changes a lot from step to step: its thresholds are large
    data = step_cache.calibrate(pipe, images(), PROMPTS, SEEDS, 0.5, steps=STEPS, width=W, height=H, out=path,
                                agree=0.5)  # fmt: skip
    assert json.loads(path.read_text())["skips"] == data["skips"] and len(data["skips"]) == STEPS
    print(f"calibrated at fbc:0.5: skips {data['skips']}, per item {data['per_item']}")
    assert all(0 < sum(p) < STEPS - 1 for p in data["per_item"]) and sum(data["skips"]) > 0
    for i in range(2):  # each item alone: FBC, then its own decisions replayed as a schedule
        fbc = pipe([images()[i]], [PROMPTS[i]], [SEEDS[i]], steps=STEPS, width=W, height=H, output="latents",
                   cache="fbc:0.5")  # fmt: skip
        own = tuple(bool(s) for s in pipe.last_cache_skips[:, 0])
        assert list(own) == [bool(s) for s in data["per_item"][i]]
        replay = pipe([images()[i]], [PROMPTS[i]], [SEEDS[i]], steps=STEPS, width=W, height=H, output="latents",
                      cache=step_cache.CacheSpec(skips=own))  # fmt: skip
        np.testing.assert_array_equal(pipe.last_cache_skips[:, 0], own)
        np.testing.assert_allclose(replay, fbc, rtol=0, atol=1e-6)  # one ulp apart under the tests' LLVM flags
    # the file as an option: steps reused by both items, the same program for any batch size
    both = run(pipe, cache=f"schedule:{path}")
    assert pipe.last_cache_skips[:, 0].tolist() == data["skips"]
    assert np.isfinite(both).all()
    with pytest.raises(ValueError, match="has 8 steps, the edit 4"):
        pipe(images(), PROMPTS, SEEDS, steps=4, width=W, height=H, output="latents", cache=f"schedule:{path}")


def test_cache_options_checked():
    assert step_cache.parse("off") is None and step_cache.parse(None) is None
    assert step_cache.parse("fbc:0.08") == step_cache.CacheSpec(threshold=0.08)
    assert step_cache.parse("tea:0.4") == step_cache.CacheSpec(threshold=0.4, signal="tea")
    assert step_cache.parse("tea:0.4").text == "tea:0.4"
    for bad in ("fbc:-1", "fbc:x", "tea:-1", "tea:", "mag:1", "schedule:", 3):
        with pytest.raises(ValueError):
            step_cache.parse(bad)
    with pytest.raises(ValueError, match="first step"):
        step_cache.CacheSpec(skips=(True, False))
    from jaxedit.options import check_option

    assert check_option("cache", "fbc:0.1", "cache") == "fbc:0.1"
    assert check_option("cache", "tea:0.4", "cache") == "tea:0.4"
    with pytest.raises(ValueError, match="threshold"):
        check_option("cache", "fbc:nan", "cache")


def test_step1x_through_the_same_split():
    from jaxedit.step1x.pipeline import Step1XEditPipeline

    preset = presets.get("step1x-edit-tiny")
    pipe = Step1XEditPipeline(preset, random_params(preset), None, dtype=jnp.float32, size_level=32)
    rng = np.random.default_rng(0)
    llm = (rng.standard_normal((4, 6, preset.connector.in_channels)).astype(np.float32), np.ones((4, 6), np.int32))
    kw = dict(steps=STEPS, output="latents", llm=llm)
    plain = pipe(images(), PROMPTS, SEEDS, **kw)
    for cache in ("fbc:0", "tea:0"):
        zero = pipe(images(), PROMPTS, SEEDS, cache=cache, **kw)
        np.testing.assert_allclose(zero, plain, rtol=0, atol=2e-6)  # ulps apart under the tests' LLVM flags
    skipped = pipe(images(), PROMPTS, SEEDS, cache="fbc:1e9", **kw)
    assert pipe.last_cache_skips[1:].all() and np.isfinite(skipped).all()
    print(f"Step1X-Edit fbc:1e9: {STEPS - 1}/{STEPS} steps reused, rel diff {rel(skipped, plain):.2e}")
    assert rel(skipped, plain) > 1e-3
    tea = pipe(images(), PROMPTS, SEEDS, cache="tea:1e9", **kw)  # (no rescaling polynomial: the plain distance)
    assert pipe.last_cache_skips[1:-1].all() and not pipe.last_cache_skips[[0, -1]].any() and np.isfinite(tea).all()


def test_calibrate_command_writes_a_schedule_edit_replays(pipe, tmp_path, capsys):
    from jaxedit.cli import main as cli

    for i, im in enumerate(images()):
        im.save(tmp_path / f"{i}.png")
    folder, out = str(pipe.folder.path), tmp_path / "s.json"
    args = ["--image", str(tmp_path / "0.png"), "--prompt", PROMPTS[0], "--image", str(tmp_path / "1.png"), "--prompt",
            PROMPTS[1], "--threshold", "0.5", "--agree", "0.5", "--out", str(out), "--steps", str(STEPS)]  # fmt: skip
    assert cli(["calibrate-cache", "--model", folder, *args]) == 0
    data = json.loads(out.read_text())
    assert len(data["skips"]) == STEPS and data["calls_saved"] == sum(data["skips"]) > 0
    assert f"wrote {out}" in capsys.readouterr().out
    edit = ["edit", "--model", folder, "--image", str(tmp_path / "0.png"), "--prompt", "x", "--steps", str(STEPS),
            "--out", str(tmp_path / "o.png"), "--cache", f"schedule:{out}"]  # fmt: skip
    assert cli(edit) == 0 and (tmp_path / "o.png").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # before loading
        cli([*edit[:-1], "schedule:" + str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert "--cache: cache schedule" in err and "RANDOM" not in err, err
