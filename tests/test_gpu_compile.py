"""Compiled for NVIDIA GPUs with no GPU attached: XLA's deviceless CUDA compilation from a GPU target
description (`jaxedit.parallel.targets`, h100-8). cuDNN's fused attention must be in the programs, run per
device under shard_map. Needs the `gpu-plan` extra (the CUDA PJRT plugin and cuDNN, about 2.6 GB): not
installed by the test extra, so CI skips this file with that reason."""

from __future__ import annotations

import pytest

from jaxedit import plan, presets
from jaxedit.configs import MeshConfig
from jaxedit.parallel import sharding as sh
from jaxedit.parallel.targets import parse_target

pytest.importorskip("jax_plugins.xla_cuda12", reason='no CUDA PJRT plugin: pip install ".[gpu-plan]"')
pytest.importorskip("nvidia.cudnn", reason='no cuDNN: pip install ".[gpu-plan]"')


@pytest.mark.parametrize("task", ["infer", "train"])
def test_programs_compile_for_h100s_with_cudnn_attention_sharded(task):
    devices = parse_target("h100-8").devices()
    mesh = sh.make_mesh(MeshConfig(fsdp=4, tensor=2), devices)
    args = plan.parser().parse_args(["--task", task, "--resolution", "256", "--text-tokens", "16"])
    lowered, _ = plan.lower(presets.get("flux-kontext-tiny"), args, mesh, batch=8)
    compiled = lowered.compile()
    assert "__cudnn$fmha" in compiled.as_text()  # the fused kernel, not a fallback
    assert compiled.memory_analysis().argument_size_in_bytes > 0
