"""The AOT planner compiles a sharded step on simulated devices and its FLOP count is sane."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_plan(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "jaxedit.plan", "--json", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # over a minute on the 2-core CI machine
def test_plan_train_tiny_on_four_devices():
    r = run_plan("--preset", "flux-kontext-tiny", "--task", "train", "--mesh", "fsdp=2,tensor=2",
                 "--resolution", "128", "--batch", "4", "--text-tokens", "16")  # fmt: skip
    assert r["devices"] == 4
    assert r["tokens"] == 16 + 2 * 64 and r["target_tokens"] == 64
    assert r["arguments"] > 0 and r["temporaries"] > 0
    # XLA's count (scan bodies scaled by depth) next to the analytic count, which leaves out
    # embedders and modulations: the same order, XLA a little above
    ratio = r["xla_flops_per_device"] * r["devices"] / r["analytic_flops"]
    assert 0.8 < ratio < 2.0, ratio


def test_plan_refuses_an_open_mesh_axis(capsys):
    """`--mesh fsdp=-1` ("all devices") means nothing to a planner that simulates the mesh's devices."""
    from jaxedit.plan import main

    with pytest.raises(SystemExit) as e:
        main(["--task", "train", "--mesh", "fsdp=-1"])
    assert e.value.code == 2
    assert "every axis needs a size >= 1" in capsys.readouterr().err
