"""Ahead-of-time planner: compile a full-size program on abstract inputs for a TPU slice (the TPU
compiler, libtpu), NVIDIA GPUs (deviceless, the CUDA plugin) or simulated CPU devices; report per-chip
memory, FLOPs and time estimates.

    jaxedit plan --task train --target v5p-8 --resolution 1024 --batch 8
    jaxedit plan --task sample --target v6e-4 --mesh fsdp=4 --steps 28
    jaxedit plan --task train --target h100-8 --batch 8
    jaxedit plan --task train --mesh fsdp=64          # no --target: 64 simulated CPU devices
    jaxedit plan --task sample --target v5p-8 --references 3   # FLUX Kontext, 3 reference images per edit

Tasks (the programs jaxedit runs; --preset picks FLUX.1 Kontext or Step1X-Edit, whose DiT includes
its connector):
  train       the real train step (`jaxedit.train.step.Trainer`): flow-matching loss, gradients,
              AdamW, float32 master weights and Adam state, bf16 compute, donated state
  lora        the same with LoRA adapters (rank --lora-rank) on a frozen base
  infer       one transformer call on [target | reference(s)] tokens (bf16)
  sample      the pipeline's whole jitted denoising loop, --steps Euler steps (Step1X: with CFG)
  vae-decode  the VAE decoder at the resolution (float32, as the pipelines run it)
  text        T5 + CLIP text encoders (bf16; FLUX presets)
  generate    Qwen2.5-VL answering (the judge of `jaxedit eval`): --preset qwen2.5-vl-7b / qwen2.5-vl-72b, or
              an editing preset's Qwen2.5-VL (step1x-edit, qwen-image-edit-2509)

Memory is per chip from the compiled program's `memory_analysis()`: arguments + outputs +
temporaries - aliased (donated) buffers. Time, two ways: the compiler's own estimate (the
`estimated_cycles` the TPU compiler writes on each instruction, loops counted as often as they run:
`jaxedit.parallel.hlo_cost`; Mosaic kernels, which carry no estimate, at the chip's peak), converted
with the compiler's own seconds per cycle (an 8192^3 bf16 matmul's `optimal_seconds` over its
`estimated_cycles` on the same chip); and the MFU bound, the model FLOPs (analytic) at the chip's
published peak. GPU targets get memory and the MFU bound (their compiler gives no cost estimate); CPU
devices memory and FLOPs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from jaxedit import families, presets
from jaxedit.options import QUANTIZE

TASKS = ("train", "lora", "infer", "sample", "vae-decode", "text", "generate")
PIPELINE_TASKS = ("sample", "vae-decode", "text")  # placed as the pipelines place them (`--mesh` default: auto)


def at_least(lo: int):
    """An argparse type: an integer >= lo (0 and negative sizes are refused, never read as "the default")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is not >= {lo}")
        return value

    return parse


POSITIVE = at_least(1)


def parser(prog: str = "python -m jaxedit.plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )  # fmt: skip
    p.add_argument("--preset", default="flux-kontext-dev", help="model preset (default flux-kontext-dev)")
    p.add_argument("--task", choices=TASKS, required=True, help="the program to compile")
    p.add_argument("--target", default=None, help="TPU slice: v5p-8, v5p-64, v6e-4, v6e-64, v5e-16, v5e-256, ... "
                   "or a topology such as v5p:2x2x1 (needs libtpu), or GPUs: h100-8 (needs the gpu-plan extra); "
                   "default: simulated CPU devices")  # fmt: skip
    p.add_argument("--slices", type=POSITIVE, default=1, help="TPU: this many slices of --target over the data-center "
                   "network (multi-slice; the default mesh is then dcn_data=SLICES,fsdp=-1)")  # fmt: skip
    p.add_argument("--mesh", default=None, help="e.g. fsdp=64, fsdp=16,tensor=4, data=2,fsdp=32, or auto: compile "
                   "the candidate placements, rank them and (sample) record the best for the pipelines' mesh 'auto' "
                   "(default: sample, text, vae-decode as the pipelines place them, i.e. their 'auto' rule; train, "
                   "lora, infer every device on fsdp; with --target one axis may be -1: the remaining "
                   "chips)")  # fmt: skip
    p.add_argument("--resolution", type=at_least(16), default=1024, help="square image side in pixels")
    p.add_argument("--batch", type=POSITIVE, default=None, help="global batch (default: one per data-parallel device)")
    p.add_argument("--text-tokens", type=POSITIVE, default=None, help="text tokens (default: T5's 512 / Qwen's 640)")
    p.add_argument("--steps", type=POSITIVE, default=28, help="sample: denoising steps")
    p.add_argument("--new-tokens", type=POSITIVE, default=512, help="generate: tokens the Qwen2.5-VL judge generates "
                   "(the prompt: --text-tokens, default 256, + the image at --resolution)")  # fmt: skip
    p.add_argument(
        "--remat", default="full", help="train/lora: remat policy (none, full, dots, dots_no_batch, offload)"
    )
    p.add_argument("--mlp-chunks", type=POSITIVE, default=1, help="train/lora: the MLPs on this many token slices")
    p.add_argument("--attention", default="auto", help="attention impl (auto: splash on TPU, chunked on CPU)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="infer/sample/text: int8 / fp8 DiT and T5 block weights (jaxedit.quant)")  # fmt: skip
    p.add_argument("--text-on-cpu", action="store_true", help="FLUX: the pipeline keeps T5 and CLIP on the host "
                   "(jaxedit edit --text-on-cpu): the weights mesh 'auto' places by leave them out")  # fmt: skip
    p.add_argument("--lora-rank", type=POSITIVE, default=16, help="lora: adapter rank")
    p.add_argument("--no-reference", action="store_true", help="text-to-image: no Kontext reference tokens")
    p.add_argument("--references", type=at_least(0), default=1, help="FLUX Kontext: reference images per sample, each "
                   "at --resolution (default 1; 0 = --no-reference)")  # fmt: skip
    p.add_argument("--cache", default=None, help="sample: the loop with a step cache (fbc:T, tea:T, schedule:FILE; "
                   "jaxedit.step_cache); the report costs a reusing and a computing step apart")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    return p


def main(argv=None, prog: str = "python -m jaxedit.plan") -> int:
    """Parse, set the simulated device count (CPU), compile, print (and with --json, a JSON line)."""
    p = parser(prog)
    args = p.parse_args(argv)
    from jaxedit.configs import MeshConfig

    try:  # before the device count is set and jax imported
        presets.qwen_vl(args.preset) if args.task == "generate" else presets.get(args.preset)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2

    pipeline_default = args.mesh is None and args.task in PIPELINE_TASKS and args.slices == 1
    if args.mesh == "auto" and args.slices != 1:
        p.error("--mesh auto: the pipelines run on one slice (no --slices)")
    try:
        default = "fsdp=-1" if args.slices == 1 else f"dcn_data={args.slices},fsdp=-1"
        auto = args.mesh == "auto" or pipeline_default
        spec = "fsdp=-1" if auto else args.mesh or default if args.target else args.mesh or "fsdp=8"
        mesh_cfg = MeshConfig.parse("fsdp=8" if auto and not args.target else spec)
    except ValueError as e:
        p.error(str(e))
    sizes = dataclasses.astuple(mesh_cfg)
    if args.target is None:
        if any(v < 1 for v in sizes):
            p.error(f"--mesh {args.mesh}: every axis needs a size >= 1 (the planner simulates exactly the devices "
                    f"the mesh names; -1 'all devices' has meaning only with --target)")  # fmt: skip
        n = math.prod(sizes)
        if "jax" in sys.modules:
            raise RuntimeError("jaxedit.plan must set the simulated device count before jax is imported")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend: TPU chips come from libtpu
        from jaxedit.parallel.targets import parse_target

        try:
            parse_target(args.target)
        except ValueError as e:
            p.error(str(e))
    try:
        if args.mesh == "auto":
            return plan_auto(args)
        report = plan(args, None if pipeline_default else mesh_cfg)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        print(json.dumps(report))
    return 0


def plan_auto(args) -> int:
    """`--mesh auto`: compile every candidate placement of the program on the target's chips (data parallel
    over FSDP groups of 1, 2, 4, ... chips; tensor groups of 2, 4, 8), print them ranked (fitting first, then
    by the compiler's time), and for `sample` record the best as the pipelines' choice
    (`jaxedit.parallel.placement.record`)."""
    from jaxedit import configs, quant
    from jaxedit.parallel import placement

    devices = target_devices(args)
    n = len(devices)
    candidates = [configs.MeshConfig(data=n // g, fsdp=g) for g in placement.fsdp_groups(n)]
    candidates += [configs.MeshConfig(data=n // g, fsdp=1, tensor=g) for g in (2, 4, 8) if g <= n and n % g == 0]
    reports = []
    for cfg in candidates:
        a = argparse.Namespace(**vars(args) | {"mesh": placement.text(cfg), "batch": args.batch or n})
        try:
            r = plan(a, cfg)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory in the compiler
            r = {"mesh": placement.text(cfg), "error": str(e).splitlines()[0][:200]}
        reports.append(r)
        print(f"  {r['mesh']}: " + (r.get("error") or summary(r)), flush=True)
        if args.json:
            print(json.dumps(r))
    ok = [r for r in reports if "error" not in r and r.get("fits", True)]
    rank = sorted(ok, key=lambda r: r.get("compiler_seconds") or r.get("mfu_bound_seconds") or r["total"])
    print("ranked (fits, fastest first):")
    for i, r in enumerate(rank):
        print(f"  {i + 1}. {r['mesh']}: {summary(r)}")
    if not rank:
        print("error: no candidate placement fits", file=sys.stderr)
        return 2
    best = rank[0]
    if args.task == "sample":
        preset = presets.get(args.preset)
        key = placement.key_for(preset, quant.check_mode(args.quantize), devices)
        detail = {"task": args.task, "resolution": args.resolution, "batch": best["batch"],
                  "gb_per_chip": best["total"] / 1e9, "estimate_s": best.get("compiler_seconds")}  # fmt: skip
        where = placement.record(key, configs.MeshConfig.parse(best["mesh"]), detail)
        print(f"recorded {best['mesh']} for mesh 'auto' on {n} x {devices[0].device_kind}: {where}")
    return 0


def summary(r: dict) -> str:
    """One line of a report: GB per chip, fits, compiler estimate, est./bound."""
    est, bound = r.get("compiler_seconds"), r.get("mfu_bound_seconds")
    out = f"{r['total'] / 1e9:.2f} GB/chip" + ("" if "fits" not in r else " fits" if r["fits"] else " DOES NOT FIT")
    out += f", batch {r['batch']}"
    if est:
        out += f", estimate {est:.3f} s"
    if est and bound:
        out += f" ({est / bound:.2f}x the MFU bound)"
    return out


def target_devices(args) -> list:
    import jax

    if not args.target:
        return jax.devices()
    from jaxedit.parallel.targets import parse_target

    return parse_target(args.target).devices()


# --------------------------------------------------------------------------------------------------
# the programs


def shapes_of(preset, args) -> dict:
    """Token counts of a Kontext / Step1X-Edit program at the requested resolution."""
    f = preset.vae.downsample
    h = w = args.resolution // f  # latent cells
    n_target = (h // 2) * (w // 2)
    refs, family = 0 if args.no_reference else args.references, families.of(preset)
    most = family.max_references
    if refs < 0 or (most is not None and refs > most):
        raise ValueError(f"--references {refs}: {f'{family.title} takes {most}' if refs > 0 else 'give 0 or more'}")
    n_ref = refs * n_target
    lt = args.text_tokens or family.text_tokens(preset)
    return dict(latent=(h, w), target_tokens=n_target, references=refs, reference_tokens=n_ref, text_tokens=lt,
                tokens=lt + n_target + n_ref)  # fmt: skip


def lower(preset, args, mesh, batch: int):
    """The task's program lowered on abstract, sharded inputs: (jax.stages.Lowered, info)."""
    import jax
    import jax.numpy as jnp

    from jaxedit.parallel import sharding as sh

    if args.task == "generate":
        return lower_generate(preset, args, mesh, batch)
    s = shapes_of(preset, args)
    h, w = s["latent"]
    z = preset.vae.z_channels
    bsd = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh.batch_sharding(mesh, len(shape)))  # noqa: E731
    rep = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dt, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    cfg, family = preset.transformer, families.of(preset)
    from jaxedit import quant, step_cache

    if quant.check_mode(args.quantize) and args.task not in ("infer", "sample", "text"):
        raise ValueError(f"--quantize: the {args.task} program has no quantised weights (infer, sample, text have)")
    if args.task in ("train", "lora"):
        from jaxedit.train.lora import LoraConfig
        from jaxedit.train.objective import ObjectiveConfig
        from jaxedit.train.optim import OptimConfig
        from jaxedit.train.step import Trainer

        trainer = Trainer(
            cfg, ObjectiveConfig(ref_index=family.reference_index), OptimConfig(), 1000, mesh, dtype=jnp.bfloat16,
            remat_policy=args.remat, mlp_chunks=args.mlp_chunks, attention_impl=args.attention,
            **{c: getattr(preset, c) for c in family.transformer_configs},  # e.g. Step1X-Edit's connector
            lora=LoraConfig(rank=args.lora_rank) if args.task == "lora" else None,
        )  # fmt: skip
        rh, rw = (h, w) if s["reference_tokens"] else (2, 2)  # the objective always has a reference
        lt = s["text_tokens"]
        batch_in = {"target": (batch, h, w, z), "reference": (batch, rh, rw, z)}
        batch_in |= {f"reference_{i}": (batch, h, w, z) for i in range(1, s["references"])}
        structs = {k: jax.ShapeDtypeStruct((1, *v), jnp.float32) for k, v in batch_in.items()}
        text = family.train_text(preset, batch, lt)
        structs |= {k: jax.ShapeDtypeStruct((1, *shape), jnp.dtype(dt)) for k, (shape, dt) in text.items()}
        return trainer.lower(structs), s
    if args.task in ("infer", "sample"):
        boxed = family.abstract_params(preset, "transformer", jnp.bfloat16, boxed=True)
        params = sh.abstract_with_shardings(quant.quantize_abstract("transformer", boxed, args.quantize), mesh)
        lt, nt, nr = s["text_tokens"], s["target_tokens"], s["reference_tokens"]
        # the modules outside the mesh context: building them creates (host) example arrays
        model = family.module(preset, "transformer", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                              attention_impl=args.attention)  # fmt: skip
        pipe = sample_pipeline(preset, mesh, args.attention) if args.task == "sample" else None
        with sh.activate(mesh):
            if args.task == "infer":
                img = (bsd((batch, nt + nr, cfg.in_channels)), bsd((batch, nt + nr, 3), jnp.float32))
                rest = family.infer_text(preset, batch, lt, bsd)
                fn = lambda p, *a: model.apply({"params": p}, *a)[:, :nt]  # noqa: E731
                return jax.jit(fn).lower(params, *img, *rest), s
        mode = quant.check_mode(args.quantize)
        on, args_ = family.sample_inputs(pipe, batch, h, w, args.steps, references=s["references"] if nr else 0,
                                         text_tokens=lt, quantize=mode)  # fmt: skip
        cache = step_cache.parse(args.cache)
        if cache is not None:
            pipe.check_cache(cache)
            cache.check_steps(args.steps)
        with sh.activate(on):
            return pipe.denoise.lower(*args_, **({} if cache is None else {"cache": cache})), s
    if args.task == "vae-decode":
        from jaxedit.models.autoencoder import AutoEncoder
        from jaxedit.models.autoencoder import abstract_params as vae_params

        vae = AutoEncoder(preset.vae)
        params = sh.abstract_with_shardings(vae_params(preset.vae, jnp.float32, boxed=True), mesh)
        with sh.activate(mesh):
            fn = lambda p, z: vae.apply({"params": p}, z, method="decode")  # noqa: E731
            return jax.jit(fn).lower(params, bsd((batch, h, w, z), jnp.float32)), s
    if args.task == "text":
        lowered, figures = family.lower_text(preset, args, mesh, batch, bsd, rep)
        return lowered, s | figures
    raise ValueError(f"unknown task {args.task!r}")


def lower_generate(q, args, mesh, batch: int):
    """Qwen2.5-VL `q` (`presets.qwen_vl`: a judge or an editing preset's) generating (greedy, `--new-tokens`) after
    `batch` prompts of `--text-tokens` text tokens (default 256) with one image each at --resolution (resized as
    the Qwen2-VL processor's defaults do)."""
    from jaxedit.models.qwen2_5_vl_generate import lower_generate as lower_qwen
    from jaxedit.qwen_vl import bucket, smart_resize

    factor = q.vision.patch_size * q.vision.spatial_merge_size
    h, w = smart_resize(args.resolution, args.resolution, factor, 56 * 56, 28 * 28 * 16384)
    units = (h // factor) * (w // factor)
    tokens = bucket((args.text_tokens or 256) + units, 64)
    return lower_qwen(q, mesh, batch, prompt_tokens=tokens, image_units=units * batch, new_tokens=args.new_tokens,
                      attention_impl=args.attention)  # fmt: skip


def sample_pipeline(preset, mesh, attention: str):
    """The family's pipeline object placed on `mesh` (no weights loaded): its `sample_inputs` and `denoise` are
    the sampling loop's placement and program."""
    import jax.numpy as jnp

    from jaxedit.parallel.placement import config_of

    pipe = families.of(preset).pipeline()(preset, {}, None, dtype=jnp.bfloat16, devices=list(mesh.devices.flat),
                                          mesh=config_of(mesh))  # fmt: skip
    pipe.model = pipe.model.clone(attention_impl=attention)
    return pipe


# --------------------------------------------------------------------------------------------------
# figures


def analytic_forward_flops(cfg, tokens: int) -> float:
    """2 x (per-token block weights) x L + 4 x L^2 x D x blocks (conventions.md; embedders and
    per-sample modulation left out). Full size: 2 x 6.455e9 x L + 4 x L^2 x 3072 x 57."""
    d, m, n = cfg.hidden_size, cfg.mlp_hidden_dim, sum(layers for _, layers in cfg.stacks)
    return 2.0 * n * (4 * d * d + 2 * d * m) * tokens + 4.0 * tokens * tokens * d * n


def model_flops(preset, args, info: dict, batch: int) -> float | None:
    """The task's model FLOPs per program run (the MFU convention: a train step is 3 forwards, the remat
    recompute is not counted); None for the VAE, the text encoders and generation."""
    if args.task in ("vae-decode", "text", "generate"):
        return None
    f = analytic_forward_flops(preset.transformer, info["tokens"]) * batch
    if args.task in ("train", "lora"):
        return 3 * f
    if args.task == "infer":
        return f
    if args.task == "sample":
        return f * args.steps * families.of(preset).cfg_passes  # e.g. Step1X-Edit's CFG doubles the batch
    return None


_SECONDS_PER_CYCLE: dict[str, float] = {}


def seconds_per_cycle(device) -> float:
    """The TPU compiler's own seconds per estimated cycle on this kind of chip: an 8192^3 bf16 matmul's
    `optimal_seconds` (its FLOPs at the compiler's peak) over its `estimated_cycles`."""
    if device.device_kind not in _SECONDS_PER_CYCLE:
        _SECONDS_PER_CYCLE[device.device_kind] = _matmul_seconds_per_cycle(device)
    return _SECONDS_PER_CYCLE[device.device_kind]


def _matmul_seconds_per_cycle(device) -> float:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxedit.parallel.hlo_cost import program_cycles

    s = jax.ShapeDtypeStruct(
        (8192, 8192), jnp.bfloat16, sharding=NamedSharding(Mesh([device], ("x",)), PartitionSpec())
    )
    compiled = jax.jit(lambda a, b: a @ b).lower(s, s).compile()
    return compiled.cost_analysis()["optimal_seconds"] / program_cycles(compiled.as_text()).cycles


def pipeline_mesh(preset, args, devices, memory: float | None):
    """The mesh the family's pipeline chooses with mesh "auto" on `devices` of `memory` bytes each
    (`jaxedit.pipelines.base.choose_mesh`, with the pipeline's own weight and token figures)."""
    import jax.numpy as jnp

    from jaxedit import quant
    from jaxedit.pipelines.base import choose_mesh

    mode = quant.check_mode(args.quantize)
    footprint = families.of(preset).footprint(preset, jnp.bfloat16, mode, args.text_on_cpu)
    return choose_mesh(preset, "auto", devices, footprint, quantize=mode, memory=memory)


def plan(args, mesh_cfg) -> dict:
    import dataclasses

    import jax

    from jaxedit.parallel.sharding import make_mesh

    if getattr(args, "cache", None) and args.task != "sample":
        raise ValueError(f"--cache: the {args.task} program has no step cache (sample has)")
    preset = presets.qwen_vl(args.preset) if args.task == "generate" else presets.get(args.preset)
    target = None
    if args.target:
        from jaxedit.parallel.targets import parse_target

        target = dataclasses.replace(parse_target(args.target), slices=args.slices)
        devices = target.devices()
    else:
        devices = jax.devices()
    chosen = mesh_cfg is None
    if chosen:  # as the pipeline places it: its mesh "auto" (recorded choice, else the rule)
        mesh_cfg = pipeline_mesh(preset, args, devices, None if target is None else target.hbm_bytes)
    mesh = make_mesh(mesh_cfg, devices)
    batch = args.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    t0 = time.perf_counter()
    lowered, info = lower(preset, args, mesh, batch)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    cost = compiled.cost_analysis() or {}  # None for GPU targets
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    where = "cpu" if target is None else target.name + (f" x{target.slices}" if target.slices > 1 else "")
    mesh_text = args.mesh or ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "single device"
    mesh_text += " (auto)" if chosen else ""
    report = dict(
        preset=args.preset, task=args.task, target=where, mesh=mesh_text, chips=mesh.devices.size,
        resolution=args.resolution, batch=batch, remat=args.remat if args.task in ("train", "lora") else "-",
        mlp_chunks=args.mlp_chunks,
        attention=args.attention, compile_s=seconds, arguments=mem.argument_size_in_bytes,
        outputs=mem.output_size_in_bytes, aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
        host_temporaries=mem.host_temp_size_in_bytes,
        total=total, xla_flops_loop_bodies_once=cost.get("flops"), **info,
    )  # fmt: skip
    if getattr(args, "cache", None):
        report["cache"] = args.cache
    flops = model_flops(preset, args, info, batch)
    report["model_flops"] = flops
    if target is not None:
        report |= dict(
            hbm=target.hbm_bytes, fits=total <= target.hbm_bytes,
            mfu_bound_seconds=None if flops is None else flops / target.peak_flops,
        )  # fmt: skip
    if target is not None and target.generation.platform == "tpu":
        from jaxedit.parallel.hlo_cost import program_cycles

        walk = program_cycles(compiled.as_text())
        spc = seconds_per_cycle(devices[0])
        kernel_s = walk.kernel_flops / target.generation.peak_bf16_flops
        report |= dict(
            cycles=walk.cycles,
            cycles_loop_bodies_once=walk.cycles_body_once, seconds_per_cycle=spc, kernel_runs=dict(walk.kernels),
            kernel_flops_per_chip=walk.kernel_flops, unknown_trip_counts=walk.unknown_loops,
            compiler_seconds=walk.cycles * spc + kernel_s, kernel_seconds=kernel_s,
            seconds_by_kind={k: c * spc for k, c in walk.by_kind.most_common()},
            collective_bytes=dict(walk.collective_bytes),
            ici_seconds=sum(walk.collective_bytes.values()) / target.generation.ici_bytes_per_s
            if target.generation.ici_bytes_per_s else None,
            largest=[(c * spc, n, k, text[:160]) for c, n, k, text in walk.largest],
            conditionals=[{"runs": n, "branch_seconds": [c * spc for c in costs]} for n, costs in walk.conditionals],
        )  # fmt: skip
    return report


def format_report(r: dict) -> str:
    gb = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
    lines = [
        f"{r['preset']} {r['task']} @ {r['resolution']}px, batch {r['batch']} "
        + (
            ""
            if r["task"] in ("vae-decode", "text", "generate")
            else f"({r['tokens']} tokens/sample: {r['text_tokens']} text + "
            f"{r['target_tokens']} target + {r['reference_tokens']} reference"
            + (f" in {r['references']} images" if r.get("references", 1) > 1 else "")
            + "), "
        )  # fmt: skip
        + f"{r['target']} mesh {r['mesh']} = {r['chips']} {'chips' if r['target'] != 'cpu' else 'devices'}, "
        f"remat {r['remat']}, attention {r['attention']}" + (f", step cache {r['cache']}" if r.get("cache") else ""),
        f"  compile: {r['compile_s']:.1f}s",
        f"  per-chip memory: arguments {gb(r['arguments'])}, outputs {gb(r['outputs'])} (aliased "
        f"{gb(r['aliased'])}), temporaries {gb(r['temporaries'])}, total {gb(r['total'])}"
        + (f" of {gb(r['hbm'])}: {'fits' if r['fits'] else 'DOES NOT FIT'}" if "hbm" in r else "")
        + (f"; host memory {gb(r['host_temporaries'])} (offloaded)" if r.get("host_temporaries") else ""),
    ]
    if r["task"] == "generate":
        lines.append(
            f"  generate: {r['prompt_tokens']} prompt tokens ({r['image_features']} image features in the "
            f"batch) + {r['new_tokens']} new tokens, key/value cache {gb(r['kv_cache_bytes'])} in all"
        )
    if r["model_flops"]:
        lines.append(f"  model FLOPs per run: {r['model_flops'] / 1e12:.1f} TFLOP (analytic)")
    if r.get("mfu_bound_seconds") and "compiler_seconds" not in r:
        lines.append(f"  time per run: MFU bound {r['mfu_bound_seconds']:.3f} s (model FLOPs at peak)")
    if "compiler_seconds" in r:
        k = ", ".join(f"{n} x{c}" for n, c in r["kernel_runs"].items()) or "none"
        lines.append(
            f"  time per run: compiler estimate {r['compiler_seconds']:.3f} s ({r['cycles'] / 1e6:.1f}M cycles "
            f"x {r['seconds_per_cycle'] * 1e9:.3f} ns + Mosaic kernels {r['kernel_seconds']:.3f} s at peak: {k})"
            + (f"; MFU bound {r['mfu_bound_seconds']:.3f} s (model FLOPs at peak)" if r["mfu_bound_seconds"] else "")
        )
        est = r["compiler_seconds"]
        parts = ", ".join(f"{k} {v:.3f} s ({100 * v / est:.0f}%)" for k, v in r["seconds_by_kind"].items() if v > 0)
        lines.append(f"  by kind: {parts}, Mosaic kernels {r['kernel_seconds']:.3f} s")
        if r["collective_bytes"]:
            moved = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in r["collective_bytes"].items())
            ici = f" = {r['ici_seconds']:.3f} s at the chip's ICI bandwidth" if r.get("ici_seconds") else ""
            lines.append(f"  received per run per chip: {moved}{ici}")
        for c in r.get("conditionals") or []:
            each = " / ".join(f"{x * 1e3:.2f} ms" for x in c["branch_seconds"])
            lines.append(f"  conditional: {c['runs']} runs, one run of each branch {each} (the estimate counts the "
                         f"largest every run)")  # fmt: skip
        if r["unknown_trip_counts"]:
            lines.append(f"  note: loops counted once (trip count unknown): {', '.join(r['unknown_trip_counts'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
