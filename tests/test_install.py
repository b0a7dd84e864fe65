"""`pip install .` (a built wheel, not an editable install) in a fresh virtual environment gives the
main job from any folder: the console scripts, the shipped default model, configs and manifests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env=None) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_wheel_runs_the_main_job_from_another_folder(tmp_path):
    src, dist, venv, elsewhere = tmp_path / "src", tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the wheel, built as `pip install .` builds it (the build backend is installed), from a copy of the
    # checkout without build leftovers (setuptools' build/ would also leave files in the checkout)
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, src, ignore=skip)
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-w", dist, "-q"], tmp_path)
    (wheel,) = dist.glob("jaxedit-*.whl")
    # a fresh environment that takes jax, flax, ... from this one but jaxedit only from the wheel
    # (no pip of its own: this environment's pip, run by the venv's python, installs into the venv)
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path)
    bin_ = venv / "bin"
    run([bin_ / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], tmp_path)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "JAXEDIT_CACHE_DIR": "off", "JAX_PLATFORMS": "cpu"}
    env |= {k: os.environ[k] for k in ("LANG",) if k in os.environ}

    # the wheel's copies (not the checkout's), and the shipped configs by name
    code = (
        "import jaxedit, checkpoints_convert as c; from jaxedit.train.config import find_config as f; "
        "print(jaxedit.__file__, c.__file__, f('kontext_dev_lora'))"
    )
    where = run([bin_ / "python", "-c", code], elsewhere, env).split()
    assert all(Path(w).is_relative_to(venv) for w in where), where
    assert Path(where[2]).name == "kontext_dev_lora.py"

    image = ROOT / "examples" / "shapes.png"
    out = run([bin_ / "jaxedit", "edit", "--image", image, "--prompt", "make the red circle blue", "--out", "e.png"],
              elsewhere, env)  # fmt: skip
    assert "wrote e.png (64x64)" in out and (elsewhere / "e.png").is_file()

    # the converter's check against the packaged manifests
    manifest = Path(where[1]).parent / "manifests" / "bfl-ae.json"
    out = run([bin_ / "jaxedit-convert", "check", manifest, "--preset", "flux-kontext-dev"], elsewhere, env)
    assert "vs the published bfl-ae: same tensor names and shapes" in out
