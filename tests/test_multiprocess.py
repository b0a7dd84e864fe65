"""Two jax.distributed processes on localhost (gloo CPU collectives, 2 fake devices each)
run a sharded forward and SGD step; both agree with the single-process result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.helpers import rel_err
from tests.sharded_model import flat, model_and_data, train_step

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # over a minute on the 2-core CI machine
@pytest.mark.parametrize("mesh_spec", ["fsdp=2,tensor=2"])
def test_two_processes_match_single_process(tmp_path, mesh_spec):
    port = free_port()
    procs = []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(tmp_path / f"p{pid}.npz"), mesh_spec],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker process hung")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    model, _, params, args, target, opt = model_and_data()
    ref_out = jax.jit(model.apply)({"params": params}, *args)
    ref_params, _, ref_loss, ref_grads = jax.jit(train_step(model, opt))(params, opt.init(params), args, target)
    for pid in range(2):
        r = np.load(tmp_path / f"p{pid}.npz")
        assert rel_err(r["out"], ref_out) <= 1e-6
        assert abs(float(r["loss"]) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
        assert rel_err(r["grads"], flat(ref_grads)) <= 1e-6
        assert rel_err(r["params"], flat(ref_params)) <= 1e-6
    a, b = (np.load(tmp_path / f"p{i}.npz") for i in range(2))
    np.testing.assert_array_equal(a["out"], b["out"])
