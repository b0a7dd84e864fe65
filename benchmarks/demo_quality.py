"""Quality of a shapes-editing model (default: the shipped jaxedit/default_model) on held-out test seeds.

    python benchmarks/demo_quality.py [--model jaxedit/default_model] [--count 240] [--markdown docs/x.md]
    python benchmarks/demo_quality.py --model build/shapes --checkpoint checkpoints/shapes_dit --count 48
    python benchmarks/demo_quality.py --quantize int8      # the same model with int8 weights

(--split train: the same on training pairs, to tell underfitting from overfitting.
--checkpoint: the transformer of a training run's latest Orbax checkpoint, its EMA if it has one,
in the model folder's pipeline; to watch a run's quality while it trains.)

For each test-split sample (shapes, indices 0..count-1, never used in training):
the model edits the source with the instruction (pipeline defaults of the model folder, seed =
index); reported side by side, per edit type and overall:
  PSNR(edited, target)   vs   PSNR(source, target)  (the do-nothing baseline), and their gap;
  the judge's success rate (colour segmentation of the edited image vs the true target).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from common import ROOT  # noqa: F401 - puts the repo root on sys.path
from PIL import Image

import shapes
from jaxedit import DEFAULT_MODEL


def evaluate(pipe, indices: range, batch: int = 48, split: str = "test") -> list[dict]:
    """Edit test samples `indices` with `pipe`; one record per sample."""
    rows = []
    for lo in range(0, len(indices), batch):
        samples = [shapes.sample(split, i) for i in indices[lo : lo + batch]]
        outs = pipe(
            [Image.fromarray(s.source) for s in samples],
            [s.instruction for s in samples],
            [s.index for s in samples],
        )
        for s, out in zip(samples, outs):
            edited = np.asarray(out.convert("RGB"))
            rows.append(
                {
                    "index": s.index,
                    "edit": s.edit,
                    "instruction": s.instruction,
                    "psnr_edit": shapes.psnr(edited, s.target),
                    "psnr_source": shapes.psnr(s.source, s.target),
                    "ok": shapes.judge(edited, s.target).ok,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[r["edit"]].append(r)
    lines = [
        "| edit | n | PSNR edited vs target (dB) | PSNR source vs target (dB) | gain (dB) | judged correct |",
        "|---|---|---|---|---|---|",
    ]
    for name in [*shapes.EDIT_TYPES, "all"]:
        g = rows if name == "all" else groups.get(name, [])
        if not g:
            continue
        pe, ps = np.mean([r["psnr_edit"] for r in g]), np.mean([r["psnr_source"] for r in g])
        ok = np.mean([r["ok"] for r in g])
        label = "**all**" if name == "all" else name
        lines.append(f"| {label} | {len(g)} | {pe:.2f} | {ps:.2f} | {pe - ps:+.2f} | {100 * ok:.1f}% |")
    return "\n".join(lines)


def checkpoint_transformer(run_dir: str) -> tuple[int, dict]:
    """(step, transformer parameters) of the latest checkpoint of a `python -m train` run: EMA if kept."""
    import orbax.checkpoint as ocp

    root = Path(run_dir).absolute()
    with ocp.CheckpointManager(root) as manager:
        step = manager.latest_step()
    if step is None:
        raise SystemExit(f"{run_dir}: no checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(root / str(step) / "state")
    if "lora" in state:
        raise SystemExit(f"{run_dir}: a LoRA run; evaluate its exported adapters instead")
    return step, state.get("ema", state["params"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--count", type=int, default=240, help="samples of the split (indices 0..count-1)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--checkpoint", help="a training run's checkpoint_dir: use its latest transformer (EMA if any)")
    p.add_argument("--true-cfg-scale", type=float, help='true CFG scale, negative prompt "" (default: the model\'s)')
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument(
        "--split", default="test", choices=list(shapes.SPLITS), help="samples to edit (train: does it underfit?)"
    )
    p.add_argument("--quantize", choices=["int8", "fp8"], help="int8 / fp8 DiT and T5 weights (jaxedit.quant)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the model's)")
    args = p.parse_args()
    from jaxedit.kontext.pipeline import KontextPipeline

    t0 = time.perf_counter()
    pipe = KontextPipeline.load(args.model, quantize=args.quantize, dtype=args.dtype)
    print(f"weights: {pipe.quantized or 'as stored, not quantised'}, compute dtype {jnp.dtype(pipe.model.dtype)}")
    if args.checkpoint:
        step, params = checkpoint_transformer(args.checkpoint)
        pipe.set_transformer(params)
        print(f"transformer of {args.checkpoint} step {step}")
    if args.true_cfg_scale is not None:
        pipe.set_true_cfg(args.true_cfg_scale, pipe.negative_prompt)
    if args.steps:
        pipe.default_steps = args.steps
    print(f"{pipe.default_steps} steps, guidance {pipe.default_guidance}, true CFG scale {pipe.true_cfg_scale}")
    rows = evaluate(pipe, range(args.count), args.batch, split=args.split)
    seconds = time.perf_counter() - t0
    out = table(rows)
    print(out)
    print(f"\n{args.count} {args.split} edits with {args.model} in {seconds:.0f} s (load + compile included)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
