"""Multi-host training: `python -m train` as two jax.distributed processes on localhost (gloo CPU
collectives, 2 fake devices each, mesh fsdp=4) logs the same per-step losses as one process over
4 fake devices with the same global batch (each process loads its half of every global batch and
encodes it on its own devices), and its Orbax checkpoints hold the same train state.

No persistent XLA cache: one process reading an executable the other compiles would reach the
first collective long after it, past gloo's fixed 30 s rendezvous timeout."""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
import pytest

from jaxedit.checkpoint import load_params
from tests.test_multiprocess import free_port
from tests.test_train_data import write_dataset
from tests.tiny_train import ROOT, command, env, random_model_folder

# float32 compute; 8 samples a step in 2 micro-batches of 4 (one sample per device); checkpoints
# at steps 2 and 3
SETS = ("steps=3", "checkpoint_every=2", "data.batch_size=8", "grad_accum=2", "dtype=float32", "mesh=fsdp=4")


def metrics(ckpt) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (ckpt / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    model = random_model_folder(tmp_path / "model")
    data = write_dataset(tmp_path / "data", n_square=16, n_wide=0, bad=False)  # 2 batches an epoch: step 3 wraps

    port, multi = free_port(), tmp_path / "multi"
    dist = lambda pid: dict(  # noqa: E731
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)
    )
    procs = [
        subprocess.Popen(
            command(model, data, multi, *SETS),
            env=env(None, devices=2, **dist(pid)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a training process hung")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "step 3/3" in logs[0] and "step 3/3" not in logs[1]  # process 0 alone logs

    single = tmp_path / "single"
    one = subprocess.run(
        command(model, data, single, *SETS), env=env(None, devices=4), cwd=ROOT, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]

    got, ref = metrics(multi), metrics(single)
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for key in ("loss", "grad_norm", "t_mean"):
        diff = max(abs(got[s][key] - ref[s][key]) for s in ref)
        print(f"max |two processes - one process| {key}: {diff:.1e}")
        assert diff <= 2e-6 * max(abs(ref[s][key]) for s in ref), (key, got, ref)
    assert abs(ref[3]["loss"] - ref[1]["loss"]) > 0.1  # it trains: equal losses are not a constant

    # every save is one checkpoint holding both processes' data-iterator states and every shard
    assert sorted(int(d.name) for d in multi.iterdir() if d.name.isdigit()) == [2, 3]
    names = sorted(f.name for f in (multi / "3" / "data").iterdir() if f.name.startswith("process"))
    assert names == ["process_0-of-2.json", "process_1-of-2.json"]
    a, b = (jax.tree.leaves(load_params(d / "3" / "state", dtype=np.float32)) for d in (multi, single))
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))
    print(f"max |two processes - one process| checkpointed state at step 3: {diff:.1e}")
    assert diff <= 1e-6
