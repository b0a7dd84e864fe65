"""AOT planner: compile a full-size step on abstract inputs over simulated devices.

    python -m jaxedit.plan --preset flux-kontext-dev --task train --mesh fsdp=64 --resolution 1024 --batch 64

No weights are allocated: parameters, optimizer state and inputs are ShapeDtypeStructs
carrying their shardings; XLA compiles the SPMD program for N fake CPU devices and
reports per-device memory. FLOPs come from XLA's cost analysis; because XLA counts a
loop body once, the per-block cost is measured on small unrolled variants (2+1 and 1+2
blocks, same width, attention without loops) and scaled by the real depth. The analytic count is
2 x 6.455e9 x L + 4 x L^2 x 3072 x 57 per sample per forward (x3 for a train step,
rematerialisation not counted).
Memory is that of the CPU compilation of the program; on TPU/GPU the attention kernel
(splash/cuDNN) and XLA's memory scheduler differ, so treat it as an estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ACCELERATORS = {"v5p": 95e9, "v6e": 32e9, "H100": 80e9}


def parser(prog: str = "python -m jaxedit.plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux-kontext-dev")
    p.add_argument("--task", choices=["infer", "train"], required=True)
    p.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=64 or fsdp=16,tensor=4 or data=2,fsdp=32")
    p.add_argument("--resolution", type=int, default=1024, help="square image side in pixels")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: one per data-parallel device)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--remat", default="full", help="train: remat policy (none, full, dots, dots_no_batch)")
    p.add_argument("--attention", default="auto", help="attention impl (auto = chunked for long sequences on CPU)")
    p.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    p.add_argument("--no-reference", action="store_true", help="text-to-image: no Kontext reference tokens")
    return p


def main(argv=None, prog: str = "python -m jaxedit.plan") -> int:
    """Parse, set the fake device count, compile, print (and with --json, print a JSON line)."""
    p = parser(prog)
    args = p.parse_args(argv)
    from jaxedit.configs import MeshConfig

    try:
        mesh_cfg = MeshConfig.parse(args.mesh)
    except ValueError as e:
        p.error(str(e))
    sizes = {k: v for k, v in vars(mesh_cfg).items()}
    if any(v < 1 for v in sizes.values()):
        p.error(f"--mesh {args.mesh}: every axis needs a size >= 1 (the planner simulates exactly the devices "
                f"the mesh names; -1 'all devices' has no meaning here)")  # fmt: skip
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor * mesh_cfg.dcn_data * mesh_cfg.dcn_fsdp
    if "jax" in sys.modules:
        raise RuntimeError("jaxedit.plan must set the device count before jax is imported")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    report = plan(args, mesh_cfg)
    print(format_report(report))
    if args.json:
        import json

        print(json.dumps(report))
    return 0


def _step_fn(model, task: str, n_target: int):
    import jax
    import jax.numpy as jnp
    import optax

    if task == "infer":
        return lambda params, batch: model.apply({"params": params}, *batch)[:, :n_target], None

    opt = optax.adamw(1e-5, weight_decay=0.0)

    def train_step(params, opt_state, batch, target):
        def loss_fn(p):
            out = model.apply({"params": p}, *batch)[:, :n_target]
            return jnp.mean(jnp.square(out.astype(jnp.float32) - target))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step, opt


def compile_step(cfg, args, mesh, *, depth=None, single=None, scan=True, attention=None):
    """Lower + compile the step for `cfg` (optionally at another depth); returns (compiled, seconds)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxedit.models import Flux
    from jaxedit.models.flux import abstract_params
    from jaxedit.parallel import sharding as sh

    if depth is not None:
        cfg = dataclasses.replace(cfg, depth=depth, depth_single_blocks=single)
    train = args.task == "train"
    g = args.resolution // 16
    n_target = g * g
    li = n_target * (1 if args.no_reference else 2)
    lt = args.text_tokens
    b = args.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    model = Flux(
        cfg,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32 if train else jnp.bfloat16,
        scan_layers=scan,
        remat_policy=args.remat if train else "none",
        attention_impl=attention or args.attention,
    )
    boxed = abstract_params(cfg, jnp.float32 if train else jnp.bfloat16, boxed=True)
    params = sh.abstract_with_shardings(boxed, mesh)
    bsh = lambda nd: sh.batch_sharding(mesh, nd)  # noqa: E731
    sds = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=bsh(len(shape)))  # noqa: E731
    batch = (
        sds((b, li, cfg.in_channels)),
        sds((b, li, 3), jnp.float32),
        sds((b, lt, cfg.context_in_dim)),
        sds((b, lt, 3), jnp.float32),
        sds((b,), jnp.float32),
        sds((b, cfg.vec_in_dim)),
        sds((b,), jnp.float32) if cfg.guidance_embed else None,
    )
    fn, opt = _step_fn(model, args.task, n_target)
    t0 = time.perf_counter()
    with sh.activate(mesh):
        if train:
            opt_state = jax.eval_shape(opt.init, params)
            opt_shard = jax.tree.map(lambda s: s.sharding if hasattr(s, "sharding") else None, opt_state)
            opt_state = jax.tree.map(
                lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p) if p is not None else s,
                opt_state,
                opt_shard,
            )
            target = sds((b, n_target, cfg.in_channels), jnp.float32)
            jitted = jax.jit(fn, donate_argnums=(0, 1))
            compiled = jitted.lower(params, opt_state, batch, target).compile()
        else:
            compiled = jax.jit(fn).lower(params, batch).compile()
    return compiled, time.perf_counter() - t0, dict(batch=b, tokens=lt + li, target_tokens=n_target)


def analytic_forward_flops(cfg, tokens: int) -> float:
    """2 x (per-token block weights) x L + 4 x L^2 x D x blocks (conventions.md; embedders and
    per-sample modulation left out). Full size: 2 x 6.455e9 x L + 4 x L^2 x 3072 x 57."""
    d, m, n = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.depth + cfg.depth_single_blocks
    return 2.0 * n * (4 * d * d + 2 * d * m) * tokens + 4.0 * tokens * tokens * d * n


def depth_scaled_flops(cfg, flops) -> float:
    """XLA's FLOP count of a step at `cfg`'s depth, from `flops(depth, single)`: the count of the
    same step with `depth` double and `single` single blocks, unrolled, with loop-free (xla)
    attention. XLA counts a loop body once, so a scanned model's count misses all blocks but one;
    the 2+1, 1+2 and 1+1 variants give one double and one single block, scaled by the real depth."""
    c21, c12, c11 = flops(2, 1), flops(1, 2), flops(1, 1)
    return c11 + (cfg.depth - 1) * (c21 - c11) + (cfg.depth_single_blocks - 1) * (c12 - c11)


def plan(args, mesh_cfg) -> dict:
    import jax

    from jaxedit import configs
    from jaxedit.parallel.sharding import make_mesh

    cfg = configs.get(args.preset).transformer
    mesh = make_mesh(mesh_cfg)
    compiled, seconds, info = compile_step(cfg, args, mesh)
    mem = compiled.memory_analysis()
    flops_scan = compiled.cost_analysis()["flops"]

    def unrolled_flops(depth: int, single: int) -> float:
        compiled = compile_step(cfg, args, mesh, depth=depth, single=single, scan=False, attention="xla")[0]
        return compiled.cost_analysis()["flops"]

    flops_dev = depth_scaled_flops(cfg, unrolled_flops)
    n_dev = len(jax.devices())
    L, b = info["tokens"], info["batch"]
    analytic = b * analytic_forward_flops(cfg, L) * (3 if args.task == "train" else 1)
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return dict(
        preset=args.preset,
        task=args.task,
        mesh=args.mesh,
        devices=n_dev,
        resolution=args.resolution,
        remat=args.remat if args.task == "train" else "-",
        compile_s=seconds,
        arguments=mem.argument_size_in_bytes,
        outputs=mem.output_size_in_bytes,
        aliased=mem.alias_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        total=total,
        xla_flops_per_device=flops_dev,
        xla_flops_scan_body_once=flops_scan,
        analytic_flops=analytic,
        **info,
    )


def format_report(r: dict) -> str:
    gb = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
    fits = ", ".join(f"{k} ({v / 1e9:.0f} GB): {'yes' if r['total'] <= v else 'NO'}" for k, v in ACCELERATORS.items())
    xla_total = r["xla_flops_per_device"] * r["devices"]
    return "\n".join(
        [
            f"{r['preset']} {r['task']} @ {r['resolution']}px, batch {r['batch']} ({r['tokens']} tokens/sample, "
            f"{r['target_tokens']} target), mesh {r['mesh']} = {r['devices']} devices, remat {r['remat']}",
            f"  compile: {r['compile_s']:.1f}s",
            f"  per-device memory: arguments {gb(r['arguments'])}, outputs {gb(r['outputs'])} "
            f"(aliased {gb(r['aliased'])}), temporaries {gb(r['temporaries'])}, total {gb(r['total'])}",
            f"  FLOPs per step: XLA {xla_total / 1e12:.1f} TFLOP ({r['xla_flops_per_device'] / 1e12:.2f} per device), "
            f"analytic {r['analytic_flops'] / 1e12:.1f} TFLOP, XLA/analytic {xla_total / r['analytic_flops']:.3f}",
            f"  fits: {fits}",
        ]
    )


if __name__ == "__main__":
    main()
