"""`python -m train` end to end: a run killed with SIGKILL mid-way and restarted reproduces the
uninterrupted run's per-step losses exactly; a half-written checkpoint is never restored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxedit import configs
from jaxedit import sharding as sh
from jaxedit.checkpoint import save_params
from jaxedit.model_folder import write_description
from jaxedit.models import AutoEncoder, CLIPTextModel, Flux, T5Encoder
from jaxedit.tokenizers_offline import train_tokenizers
from tests.test_train_data import write_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "kontext_tiny.py"


def random_model_folder(dst: Path, seed: int = 0) -> Path:
    """A flux-kontext-tiny model folder with random weights, without compiling any init."""
    preset = configs.get("flux-kontext-tiny")
    cfg = preset.transformer
    z = np.zeros
    modules = {
        "transformer": (Flux(cfg), (z((1, 4, 64)), z((1, 4, 3)), z((1, 2, 32)), z((1, 2, 3)), z(1), z((1, 24)), z(1))),
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


def command(model: Path, data: Path, ckpt: Path) -> list[str]:
    sets = [f"model={model}", f"data.path={data}", f"checkpoint_dir={ckpt}", "steps=8", "checkpoint_every=2"]
    return [sys.executable, "-m", "train", "--config", str(CONFIG)] + [a for s in sets for a in ("--set", s)]


def env(cache: Path) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    e["JAX_PLATFORMS"] = "cpu"
    e["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # later runs reuse the first run's executables
    e["PYTHONPATH"] = str(ROOT)
    return e


def losses(ckpt: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def test_sigkill_and_restart_reproduces_the_uninterrupted_losses(tmp_path):
    model = random_model_folder(tmp_path / "model")
    data = write_dataset(tmp_path / "data", n_square=12, n_wide=0)  # one bucket: one set of compilations
    cache = tmp_path / "xla"
    run = lambda ckpt: subprocess.run(  # noqa: E731
        command(model, data, ckpt), env=env(cache), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    ref = losses(tmp_path / "full")
    assert sorted(ref) == list(range(1, 9)) and all(np.isfinite(list(ref.values())))
    assert ref[8] < 0.7 * ref[1]  # bf16 compute, remat, 2 micro-batches: it learns
    assert "samples/s" in full.stdout and "ETA" in full.stdout

    # interrupted run: SIGKILL once step 5 is logged (checkpoints every 2 steps)
    ckpt = tmp_path / "killed"
    p = subprocess.Popen(command(model, data, ckpt), env=env(cache), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        line = p.stdout.readline()
        if line.startswith("step 5/"):
            break
        assert line or p.poll() is None, "run ended before step 5"
    p.send_signal(signal.SIGKILL)
    p.wait()
    steps = sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit())
    assert steps and max(steps) <= 5
    # a checkpoint that was being written (Orbax's temporary name) is ignored on restart
    fake = ckpt / "9.orbax-checkpoint-tmp-1234567"
    fake.mkdir()
    again = run(ckpt)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {max(steps)}" in again.stdout
    assert losses(ckpt) == ref  # bit-exact: same data order, same random draws
