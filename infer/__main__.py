"""Batch and single-image editing with a jaxedit model folder.

    python -m infer --model FOLDER --manifest edits.jsonl --out DIR [--batch-size 4]
    python -m infer edit --model FOLDER --image in.png --prompt "make it snow" --out out.png

Manifest lines: {"image": path, "prompt": str, optional "id", "seed", "steps", "guidance",
"width", "height"}; outputs DIR/<id>.png and DIR/results.jsonl. Exit code 1 if any item failed.
The model family comes from the folder's jaxedit.json: FLUX.1 Kontext, or Step1X-Edit (its
Qwen2.5-VL folder is the one recorded there, or --qwen PATH).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"jaxedit model folder (default: {DEFAULT_MODEL})")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance value (default: the pipeline's)")
    p.add_argument(
        "--true-cfg-scale", type=float, default=None, help="FLUX Kontext: true CFG scale, 1 = off (default: model's)"
    )
    p.add_argument(
        "--negative-prompt", default=None, help="FLUX Kontext: negative prompt of true CFG (default: the model's)"
    )
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="transformer/text dtype (default: the model's)"
    )
    p.add_argument("--keep-size", action="store_true", help="keep the input size (floored to 16), do not resize it")
    p.add_argument("--qwen", default=None, help="Step1X-Edit: Qwen2.5-VL folder (default: the one the model records)")
    p.add_argument("--size-level", type=int, default=None, help="Step1X-Edit: working area size_level^2 (default 512)")


def _load(args):
    import jax.numpy as jnp

    from jaxedit.pipeline import KontextPipeline

    folder = Path(args.model) if args.model else DEFAULT_MODEL
    if not (folder / "jaxedit.json").is_file():
        raise SystemExit(f"error: {folder} is not a jaxedit model folder (no jaxedit.json)")
    from jaxedit.model_folder import read_description, read_options

    if read_options(folder).get("random_weights"):
        print(f"note: {folder} holds RANDOM weights (a placeholder model): the output shows the pipeline runs, "
              "it is not a real edit", file=sys.stderr)  # fmt: skip
    # the model folder's pipeline option "dtype" (e.g. float32 for a small model trained in float32), else bfloat16
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[
        args.dtype or read_options(folder).get("dtype", "bfloat16")
    ]
    if read_description(folder).family == "step1x-edit":
        from jaxedit.step1x_pipeline import Step1XEditPipeline

        if args.true_cfg_scale is not None or args.negative_prompt is not None:
            raise SystemExit("error: --true-cfg-scale/--negative-prompt are for FLUX Kontext models; "
                             "Step1X-Edit's classifier-free guidance is --guidance")  # fmt: skip
        kw = {"size_level": None} if args.keep_size else {"size_level": args.size_level} if args.size_level else {}
        try:
            return Step1XEditPipeline.load(folder, dtype=dtype, qwen=args.qwen, **kw)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
    pipe = KontextPipeline.load(folder, dtype=dtype, **({"auto_resize": False} if args.keep_size else {}))
    if args.true_cfg_scale is not None or args.negative_prompt is not None:
        scale = pipe.true_cfg_scale if args.true_cfg_scale is None else args.true_cfg_scale
        try:
            pipe.set_true_cfg(scale, pipe.negative_prompt if args.negative_prompt is None else args.negative_prompt)
        except ValueError as e:
            raise SystemExit(f"error: --true-cfg-scale: {e}") from None
    return pipe


def _defaults(args, pipe) -> dict:
    """Steps and guidance of an edit: the flags, else the model's (--guidance 0 is kept)."""
    return {
        "steps": args.steps or pipe.default_steps,
        "guidance": pipe.default_guidance if args.guidance is None else args.guidance,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    if argv[:1] == ["edit"]:
        p = argparse.ArgumentParser(prog="python -m infer edit", description="edit one image")
        p.add_argument("--image", required=True)
        p.add_argument("--prompt", required=True)
        p.add_argument("--out", required=True, help="output PNG path")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--width", type=int, default=None)
        p.add_argument("--height", type=int, default=None)
        _common(p)
        args = p.parse_args(argv[1:])
        from jaxedit.batch import ItemError, load_image

        if not args.prompt.strip():
            print("error: --prompt is empty", file=sys.stderr)
            return 2
        try:
            image = load_image(args.image)
        except ItemError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        pipe = _load(args)
        t1 = time.perf_counter()
        try:
            prepared = pipe.prepare(image, args.width, args.height)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        d = _defaults(args, pipe)
        out = pipe.generate([prepared], [args.prompt], [args.seed], guidance=[d["guidance"]], steps=d["steps"])[0]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out.save(args.out)
        t2 = time.perf_counter()
        print(
            f"wrote {args.out} ({out.width}x{out.height}); load {t1 - t0:.1f}s, edit {t2 - t1:.1f}s (compile included)"
        )
        return 0

    p = argparse.ArgumentParser(
        prog="python -m infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--manifest", required=True, help="JSONL file, one edit per line")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    _common(p)
    args = p.parse_args(argv)
    from jaxedit.batch import run_job

    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if not Path(args.manifest).is_file():
        print(f"error: manifest not found: {args.manifest}", file=sys.stderr)
        return 2
    pipe = _load(args)
    counts = run_job(pipe, Path(args.manifest), Path(args.out), batch_size=args.batch_size,
                     defaults=_defaults(args, pipe), progress=not args.no_progress)  # fmt: skip
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (already done); "
          f"results in {Path(args.out) / 'results.jsonl'}")  # fmt: skip
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
