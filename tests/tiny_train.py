"""A tiny `python -m train` run (shared by the resume and multi-process training tests): a random
flux-kontext-tiny model folder, the configs/kontext_tiny.py command line, its environment, its losses."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import numpy as np

from jaxedit import presets
from jaxedit.checkpoint import save_params
from jaxedit.model_folder import write_description
from jaxedit.models import AutoEncoder, CLIPTextModel, Flux, T5Encoder
from jaxedit.models.flux import example_inputs
from jaxedit.parallel import sharding as sh
from jaxedit.tokenizers_offline import train_tokenizers

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "kontext_tiny.py"


def random_model_folder(dst: Path, seed: int = 0) -> Path:
    """A flux-kontext-tiny model folder with random weights, without compiling any init."""
    preset = presets.get("flux-kontext-tiny")
    cfg = preset.transformer
    z = np.zeros
    modules = {
        "transformer": (Flux(cfg), example_inputs(cfg, img_tokens=4, txt_tokens=2)),
        "vae": (AutoEncoder(preset.vae), (z((1, 16, 16, 3)),)),
        "t5": (T5Encoder(preset.t5), (z((1, 8), np.int32),)),
        "clip": (CLIPTextModel(preset.clip), (z((1, 8), np.int32),)),
    }
    rng = np.random.default_rng(seed)
    for part, (module, args) in modules.items():
        shapes = sh.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
        params = jax.tree.map(
            lambda s: (
                1 + 0.1 * rng.standard_normal(s.shape) if len(s.shape) == 1 else rng.standard_normal(s.shape) * 0.05
            ).astype(np.float32),
            shapes,
        )
        save_params(dst / part, params)
    train_tokenizers(dst)
    write_description(dst, preset)
    return dst


def command(model: Path, data: Path, ckpt: Path, *sets: str) -> list[str]:
    """`python -m train` on configs/kontext_tiny.py (8 steps, checkpoints every 2) plus `sets` overrides."""
    sets = [f"model={model}", f"data.path={data}", f"checkpoint_dir={ckpt}", "steps=8", "checkpoint_every=2", *sets]
    return [sys.executable, "-m", "train", "--config", str(CONFIG)] + [a for s in sets for a in ("--set", s)]


def env(cache: Path | None, devices: int = 2, **extra: str) -> dict:
    """The environment of a training subprocess: `devices` fake CPU devices, an XLA cache shared by
    the runs (None: no persistent cache), `extra` variables."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    if cache is not None:
        e["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # later runs reuse the first run's executables
    e["PYTHONPATH"] = str(ROOT)
    return e | extra


def losses(ckpt: Path) -> dict[int, float]:
    """step -> loss from <ckpt>/metrics.jsonl."""
    recs = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def kill_at_step(cmd: list[str], env: dict, step: int, timeout: float) -> None:
    """Run `cmd` (a training command, from the repository root) and SIGKILL it once it logs "step {step}/"."""
    import signal
    import subprocess
    import time

    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if line.startswith(f"step {step}/"):
            break
        assert line or p.poll() is None, f"run ended before step {step}"
    p.send_signal(signal.SIGKILL)
    p.wait()


def cached_like_encoder(plain, cached, encoder) -> tuple[set, int]:
    """Assert every batch read from a cache equals `encoder` on the same batch read plainly (ids, instructions,
    keys, shapes, values within 1e-5); returns (the target shapes seen, how many batches had a second source)."""
    import jax

    shapes, several = set(), 0
    for i in range(plain.per_epoch):
        host, got = plain(i), cached(i)
        want = encoder(host, jax.random.key(0))
        assert got["id"] == host["id"] and got["instruction"] == host["instruction"]
        assert set(got) - {"id", "instruction", "n_bad"} == set(want)
        for k in want:
            assert got[k].shape == want[k].shape, k
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
        shapes.add(got["target"].shape)
        several += "reference_1" in got
    return shapes, several
