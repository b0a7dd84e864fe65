"""Compiled for TPU with no TPU attached: libtpu's compiler, ahead of time, over the chips of a topology
description (`jaxedit.parallel.targets`), tiny presets on a v5e:2x2 slice. The programs are the ones
jaxedit runs (the planner builds them: `jaxedit.plan.lower`), and splash attention must really be in
them as Mosaic kernels (no silent fallback), sharded over FSDP and FSDP x tensor meshes."""

from __future__ import annotations

import argparse

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from jaxedit import plan, presets
from jaxedit.configs import MeshConfig
from jaxedit.models import attention as A
from jaxedit.parallel import sharding as sh
from jaxedit.parallel.targets import parse_target, torus

pytest.importorskip("libtpu", reason='no libtpu: pip install "jax[tpu]==<jax version>" (the test extra has it)')

MESHES = {"fsdp4": MeshConfig(fsdp=4), "fsdp2_tp2": MeshConfig(fsdp=2, tensor=2)}


@pytest.fixture(scope="module")
def chips():
    return parse_target("v5e-4").devices()


def args_for(task: str, **kw) -> argparse.Namespace:
    return plan.parser().parse_args(["--task", task, "--resolution", "128", "--text-tokens", "16"] + [
        x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))
    ])  # fmt: skip


def compile_task(task: str, chips, mesh_cfg: MeshConfig, preset="flux-kontext-tiny", batch=4, **kw):
    mesh = sh.make_mesh(mesh_cfg, chips)
    lowered, info = plan.lower(presets.get(preset), args_for(task, **kw), mesh, batch)
    return lowered.compile()


def test_slice_names_map_to_topologies():
    assert [parse_target(n).topology for n in ("v5p-8", "v5p-64", "v6e-4", "v6e-64", "v5e-16", "v5e-256")] == [
        "v5p:2x2x1", "v5p:2x4x4", "v6e:2x2", "v6e:8x8", "v5e:4x4", "v5e:16x16",
    ]  # fmt: skip
    assert parse_target("v5p-8").chips == 4 and parse_target("v6e-64").hbm_bytes == 32e9
    assert torus(512, 3) == (8, 8, 8) and torus(1, 2) == (1, 1)
    assert (parse_target("h100-8").topology, parse_target("h100-16").topology) == ("1x1x8", "1x2x8")
    with pytest.raises(ValueError, match="expected a TPU slice such as v5p-8"):
        parse_target("v9x-8")


def test_auto_picks_splash_for_a_tpu_target(chips):
    """`auto` follows the devices compiled for (the mesh), not the host's CPU backend."""
    mesh = sh.make_mesh(MeshConfig(fsdp=4), chips)
    q = jax.ShapeDtypeStruct((4, 256, 2, 64), np.dtype("bfloat16"))
    assert A.target_platform() == "cpu" and A.resolve("auto", q, q) == "rows"
    with sh.activate(mesh):
        assert A.target_platform() == "tpu" and A.resolve("auto", q, q) == "splash"


@pytest.mark.parametrize(
    "task,mesh",
    # the train step on fsdp2_tp2 is the planner's test below; one forward (infer) is inside every sampling
    # loop, and FSDP alone is the train step's mesh: the infer programs and sampling on fsdp4 are -m slow
    [
        pytest.param("infer", "fsdp4", marks=pytest.mark.slow),
        pytest.param("infer", "fsdp2_tp2", marks=pytest.mark.slow),
        ("train", "fsdp4"),
        pytest.param("sample", "fsdp4", marks=pytest.mark.slow),
        ("sample int8", "fsdp2_tp2"),
    ],  # fmt: skip
)
def test_programs_compile_for_tpu_with_splash_sharded(chips, task, mesh):
    """ "sample int8": the sampling loop with int8 DiT weights (`--quantize int8`, jaxedit.quant): the program
    takes int8 block kernels, their scales sharded with the kernels' output channels (tensor)."""
    task, _, quantize = task.partition(" ")
    compiled = compile_task(task, chips, MESHES[mesh], steps=2, **({"quantize": quantize} if quantize else {}))
    text = compiled.as_text()
    kernels = {name for name in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv") if name in text}
    assert kernels == ({"splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"} if task == "train" else {"splash_mha_fwd"})
    assert 'custom_call_target="tpu_custom_call"' in text  # the Mosaic kernel itself, per device
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes > 0 and mem.temp_size_in_bytes > 0
    if quantize:
        params_layout = text.split("entry_computation_layout={(", 1)[1].split(")->", 1)[0]
        assert "s8[" in params_layout
        shardings = traverse_util.flatten_dict(compiled.input_shardings[0][0], sep="/")
        assert shardings["single_blocks/linear1_mlp/kernel"].spec == PartitionSpec(None, "fsdp", "tensor")
        assert shardings["single_blocks/linear1_mlp/kernel_scale"].spec == PartitionSpec(None, None, "tensor")


def test_step1x_dit_and_connector_compile_for_tpu(chips):
    """Step1X-Edit: splash in the DiT; the connector's padded-token mask keeps XLA attention there."""
    text = compile_task("infer", chips, MESHES["fsdp2_tp2"], preset="step1x-edit-tiny").as_text()
    assert "splash_mha_fwd" in text and 'custom_call_target="tpu_custom_call"' in text


def test_qwen_embedder_compiles_for_tpu_with_segment_masks():
    """Step1X-Edit's Qwen2.5-VL (tiny preset) planned for a v5e-4 (FSDP x tensor): the vision windows, the
    per-image full attention and the language model's causal mask over unmasked keys all run as splash
    kernels with segment ids, once per layer and block as the scans run them."""
    args = plan.parser().parse_args(["--preset", "step1x-edit-tiny", "--task", "text", "--target", "v5e-4",
                                     "--mesh", "fsdp=2,tensor=2", "--resolution", "112", "--batch", "2"])  # fmt: skip
    r = plan.plan(args, MeshConfig.parse(args.mesh))
    q = presets.get("step1x-edit-tiny").qwen
    # 112 px is enlarged to the embedder's minimum (min_pixels: 256 merged patches); 217 + 256 + 64 -> 576
    assert r["fits"] and r["image_features"] == 256 and r["qwen_tokens"] == 576
    assert r["kernel_runs"] == {"splash_mha_fwd_segmented_no_residuals": q.vision.depth + q.text.num_layers}


def test_planner_reports_compiler_time_and_kernels_for_a_tpu_target():
    """The planner on a TPU target (the train step, FSDP x tensor, remat `offload`): per-chip memory against
    HBM with the block inputs in host memory, the compiler's cycles with loops counted as often as they run,
    the splash kernels of the forward, the remat recompute and the backward with their run counts, and the
    MFU bound."""
    args = plan.parser().parse_args(["--preset", "flux-kontext-tiny", "--task", "train", "--target", "v5e-4",
                                     "--mesh", "fsdp=2,tensor=2", "--resolution", "128", "--batch", "4",
                                     "--text-tokens", "16", "--remat", "offload"])  # fmt: skip
    r = plan.plan(args, MeshConfig.parse(args.mesh))
    assert r["chips"] == 4 and r["hbm"] == 16e9 and r["fits"] and 0 < r["total"] < 1e9
    cfg = presets.get("flux-kontext-tiny").transformer
    tokens, width = 16 + 2 * 64, cfg.hidden_size
    assert r["host_temporaries"] >= (cfg.depth + cfg.depth_single_blocks) * tokens * width * 2  # bf16 inputs
    # forward + the remat recompute, then each block's backward kernels: the loops counted as they run
    blocks = cfg.depth + cfg.depth_single_blocks
    assert r["kernel_runs"] == {
        "splash_mha_fwd_segmented_residuals": 2 * blocks,
        "splash_mha_dq_segmented_no_residuals": blocks,
        "splash_mha_dkv_segmented_no_residuals": blocks,
    }
    assert r["cycles"] > r["cycles_loop_bodies_once"] > 0 and not r["unknown_trip_counts"]
    assert r["compiler_seconds"] > r["kernel_seconds"] > 0 and r["mfu_bound_seconds"] > 0
    assert "time per run: compiler estimate" in plan.format_report(r) and "(offloaded)" in plan.format_report(r)


def test_multi_slice_plan_compiles():
    """Two v5e-4 slices over the data-center network (`--slices 2`: mesh dcn_data=2, fsdp=4): the slice a
    chip belongs to comes from libtpu's topology (num_slices), and the program compiles across both."""
    args = plan.parser().parse_args(["--preset", "flux-kontext-tiny", "--task", "infer", "--target", "v5e-4",
                                     "--slices", "2", "--resolution", "128", "--text-tokens", "16"])  # fmt: skip
    r = plan.plan(args, MeshConfig(dcn_data=2, fsdp=-1))
    assert r["chips"] == 8 and r["target"] == "v5e-4 x2" and r["batch"] == 8 and r["fits"]
    assert r["kernel_runs"]  # splash, per device, across the slices


def test_the_pipelines_auto_placement_compiles_for_tpu(monkeypatch, tmp_path):
    """`jaxedit plan --task sample` without --mesh compiles the pipeline's own sampling loop as its mesh 'auto'
    places it on the target: a v5e-4 holds the tiny model on every chip (replicated data parallel: no
    collective in the program); on chips too small for it (here the rule given 2 MB per chip) auto shards the
    weights over the smallest group of chips that holds them, and the loop compiles that way with splash."""
    from jaxedit.kontext.pipeline import KontextPipeline
    from jaxedit.parallel import placement

    monkeypatch.setenv("JAXEDIT_PLACEMENTS", str(tmp_path / "none.json"))
    args = plan.parser().parse_args(["--preset", "flux-kontext-tiny", "--task", "sample", "--target", "v5e-4",
                                     "--resolution", "128", "--text-tokens", "16", "--steps", "2"])  # fmt: skip
    r = plan.plan(args, None)
    assert r["mesh"] == "data=4 (auto)" and r["fits"] and r["kernel_runs"] and not r["collective_bytes"]
    preset = presets.get("flux-kontext-tiny")
    f = KontextPipeline.footprint(preset, np.dtype("bfloat16"), {})
    chips = parse_target("v5e-4").devices()
    memory = f.weights / 2 + placement.working_set_bytes(preset.transformer.hidden_size, f.tokens, f.block_bytes)
    memory /= 0.89
    cfg = plan.pipeline_mesh(preset, args, chips, memory)
    assert cfg == MeshConfig(data=2, fsdp=2)
    lowered, _ = plan.lower(preset, args, sh.make_mesh(cfg, chips), 4)
    compiled = lowered.compile()
    shardings = traverse_util.flatten_dict(compiled.input_shardings[0][0], sep="/")
    assert shardings["single_blocks/linear1_mlp/kernel"].spec == PartitionSpec(None, "fsdp", "tensor")
    assert "splash_mha_fwd" in compiled.as_text() and "all-gather" in compiled.as_text()


def test_collectives_bytes_received_per_chip():
    """The ICI budget counts what a chip receives: an all-gather over groups of 2 of a 4 MB result brings the
    other half (2 MB; also inside an async collective fusion, its groups named by mesh axes); a 4-way
    all-reduce of 1 MB moves 2 x 3/4 MB (ring); a reduce-scatter over 4 sends the 3 other quarters of its
    operand."""
    from jaxedit.parallel import hlo_cost

    hlo = """HloModule m, entry_computation_layout={()->f32[]}

%fused (param_0: bf16[1,192,24]) -> bf16[1,192,48] {
  %param_0 = bf16[1,192,24]{1,2,0} parameter(0)
  ROOT %all-gather.1 = bf16[1,192,48]{1,2,0} all-gather(%param_0), channel_id=76,
    replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_1'}, dimensions={2}
}

ENTRY %main () -> f32[] {
  %p = bf16[1024,1024]{1,0} parameter(0)
  %ag = bf16[2048,1024]{1,0} all-gather(%p), replica_groups={{0,1},{2,3}}, dimensions={0},
    backend_config={"estimated_cycles":"100"}
  %ar = f32[512,512]{1,0} all-reduce(%x), replica_groups=[1,4]<=[4], to_apply=%add,
    backend_config={"estimated_cycles":"50"}
  %rs = (f32[1024,256]{1,0}, f32[256,256]{1,0}) reduce-scatter-start(%y), replica_groups={{0,1,2,3}}, dimensions={0}
  %f = bf16[1,192,48]{1,2,0} fusion(%p), kind=kCustom, calls=%fused
  %a2a = bf16[64,64]{1,0} all-to-all(%p), replica_groups=mesh['axis_0'=4,'axis_1'=1] {'axis_0'}, dimensions={0}
  ROOT %c = f32[] constant(0)
}
"""
    r = hlo_cost.program_cycles(hlo)
    assert r.collective_bytes["all-gather"] == 2048 * 1024 * 2 / 2 + 192 * 48 * 2 / 2  # (the second in a fusion)
    assert r.collective_bytes["all-reduce"] == 2 * 3 / 4 * 512 * 512 * 4
    assert r.collective_bytes["reduce-scatter"] == 3 * 256 * 256 * 4
    assert r.collective_bytes["all-to-all"] == 3 / 4 * 64 * 64 * 2  # groups named by mesh axes, no device_ids
    assert r.by_kind["collective"] == 150 and r.cycles == 150


def test_conditional_branches_are_costed_apart():
    """A `conditional` inside a loop: the program counts its largest branch every run (and only that branch in
    the breakdown), and keeps each branch's cost per run (`conditionals`: what a step cache's reuse saves)."""
    from jaxedit.parallel import hlo_cost

    hlo = """HloModule m

%cheap (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %c = f32[8]{0} fusion(%a), kind=kLoop, calls=%f1, backend_config={"estimated_cycles":"10"}
}

%dear (b: f32[8]) -> f32[8] {
  %b = f32[8]{0} parameter(0)
  ROOT %d = f32[8]{0} fusion(%b), kind=kLoop, calls=%f2, backend_config={"estimated_cycles":"100"}
}

%body (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[8]{0} get-tuple-element(%s), index=1
  %p = pred[] compare(%i, %i), direction=EQ
  %y = f32[8]{0} conditional(%p, %x, %x), branch_computations={%cheap, %dear}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %y)
}

%cond (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main () -> f32[] {
  %z = (s32[], f32[8]{0}) tuple()
  %w = (s32[], f32[8]{0}) while(%z), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %r = f32[] constant(0)
}
"""
    r = hlo_cost.program_cycles(hlo)
    assert r.conditionals == [(4, [10, 100])]
    assert r.cycles == 400 and sum(r.by_kind.values()) == 400


def test_planner_costs_a_reused_step_apart():
    """`plan --task sample --cache fbc:T` on a TPU target: the loop's `lax.cond` is kept (a step cache decides at
    run time), each of its runs is costed per branch, and reusing a step costs a small part of computing it (the
    rest of the blocks are skipped, not masked)."""
    args = plan.parser().parse_args(["--preset", "flux-kontext-tiny", "--task", "sample", "--target", "v6e-1",
                                     "--resolution", "128", "--batch", "1", "--steps", "4", "--text-tokens", "16",
                                     "--cache", "fbc:0.1"])  # fmt: skip
    r = plan.plan(args, MeshConfig.parse("fsdp=1"))
    assert r["cache"] == "fbc:0.1" and "step cache fbc:0.1" in plan.format_report(r)
    (cond,) = r["conditionals"]
    reuse, compute = sorted(cond["branch_seconds"])
    assert cond["runs"] == 4 and 0 <= reuse < compute / 5
    with pytest.raises(ValueError, match="--cache"):
        plan.plan(plan.parser().parse_args(["--preset", "flux-kontext-tiny", "--task", "train", "--cache", "fbc:0.1"]),
                  MeshConfig.parse("fsdp=1"))  # fmt: skip
