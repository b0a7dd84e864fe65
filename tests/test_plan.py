"""The AOT planner compiles a sharded step on simulated devices and its FLOP count is sane."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxedit import presets
from jaxedit.plan import analytic_forward_flops


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
    """The train step with two reference images per sample."""
    r = run_plan("--preset", "flux-kontext-tiny", "--task", "train", "--mesh", "fsdp=2,tensor=2",
                 "--resolution", "128", "--batch", "4", "--text-tokens", "16", "--references", "2")  # fmt: skip
    assert r["chips"] == 4 and r["target"] == "cpu"
    assert r["tokens"] == 16 + 3 * 64 and r["target_tokens"] == 64 and r["references"] == 2
    assert r["arguments"] > 0 and r["temporaries"] > 0
    assert r["model_flops"] == 3 * 4 * analytic_forward_flops(presets.get("flux-kontext-tiny").transformer, 208)


def test_plan_counts_the_tokens_of_each_reference():
    """--references N: N reference grids at the resolution (0 = --no-reference); Step1X-Edit takes one."""
    import argparse

    from jaxedit.plan import shapes_of

    kontext = presets.get("flux-kontext-dev")
    args = lambda n: argparse.Namespace(resolution=1024, no_reference=False, references=n, text_tokens=None)  # noqa: E731
    s = shapes_of(kontext, args(3))
    assert (s["target_tokens"], s["reference_tokens"], s["tokens"]) == (4096, 3 * 4096, 512 + 4 * 4096)
    assert shapes_of(kontext, args(0))["tokens"] == 512 + 4096
    with pytest.raises(ValueError, match="Step1X-Edit takes 1"):
        shapes_of(presets.get("step1x-edit"), args(2))


def test_plan_refuses_an_open_mesh_axis(capsys):
    """`--mesh fsdp=-1` ("all devices") means nothing to a planner that simulates the mesh's devices."""
    from jaxedit.plan import main

    with pytest.raises(SystemExit) as e:
        main(["--task", "train", "--mesh", "fsdp=-1"])
    assert e.value.code == 2
    assert "every axis needs a size >= 1" in capsys.readouterr().err
