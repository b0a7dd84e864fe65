"""`python -m train` end to end: a run killed with SIGKILL mid-way and restarted reproduces the
uninterrupted run's per-step losses exactly; a half-written checkpoint is never restored."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tests.test_train_data import write_dataset
from tests.tiny_train import ROOT, command, env, kill_at_step, losses, random_model_folder


@pytest.mark.slow  # over a minute on the 2-core CI machine
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
    kill_at_step(command(model, data, ckpt), env(cache), 5, timeout=240)
    steps = sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit())
    assert steps and max(steps) <= 5
    # a checkpoint that was being written (Orbax's temporary name) is ignored on restart
    fake = ckpt / "9.orbax-checkpoint-tmp-1234567"
    fake.mkdir()
    again = run(ckpt)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {max(steps)}" in again.stdout
    assert losses(ckpt) == ref  # bit-exact: same data order, same random draws
