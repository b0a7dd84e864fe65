"""CLI: python -m checkpoints_convert PART SRC DST --preset NAME [--dtype bfloat16] [--format F] [--ignore GLOB].

PART is one of the model parts in `checkpoints_convert.PARTS` (transformer, vae, t5, clip)."""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time

import numpy as np


def _dtype(name: str | None):
    if name is None:
        return None
    import ml_dtypes

    return {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[name]


def main(argv: list[str] | None = None) -> int:
    from checkpoints_convert import PARTS, ConversionError, load_part, part_config
    from jaxedit import configs

    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__)
    sub = parser.add_subparsers(dest="part", required=True)
    for part, spec in PARTS.items():
        formats = spec.formats
        t = sub.add_parser(part, help=f"a {part} checkpoint (safetensors) -> Orbax")
        t.add_argument("src", help=".safetensors file, sharded folder with its index, or a diffusers model folder")
        t.add_argument("dst", help="output Orbax checkpoint directory")
        t.add_argument("--preset", required=True, help=f"model preset: {', '.join(configs.names())}")
        t.add_argument("--format", choices=formats, default=None, help="source layout (default: detect from the keys)")
        t.add_argument(
            "--dtype", choices=["bfloat16", "float32", "float16"], default=None, help="default: keep the file's"
        )
        t.add_argument(
            "--ignore",
            action="append",
            default=[],
            metavar="GLOB",
            help="skip source tensors matching this glob on purpose (repeatable); anything else unknown is an error",
        )
        t.add_argument("--force", action="store_true", help="overwrite DST")
    pp = sub.add_parser(
        "pipeline", help="a whole FLUX / Kontext or Step1X-Edit release (diffusers or BFL layout) -> model folder"
    )
    pp.add_argument(
        "src", help="diffusers folder (model_index.json) or folder with the BFL files + text encoder folders"
    )
    pp.add_argument("dst", help="output jaxedit model folder")
    pp.add_argument("--preset", required=True, help=f"model preset: {', '.join(configs.names())}")
    pp.add_argument(
        "--dtype", choices=["bfloat16", "float32", "float16"], default=None, help="default: keep the files'"
    )
    for name in ("transformer", "vae", "t5", "clip", "tokenizer", "tokenizer_2"):
        pp.add_argument(f"--{name.replace('_', '-')}", dest=f"path_{name}", default=None, help=f"path of the {name}")
    pp.add_argument("--qwen", default=None, help="Step1X-Edit: the Qwen2.5-VL-7B-Instruct folder to record")
    pp.add_argument("--force", action="store_true", help="overwrite DST")
    args = parser.parse_args(argv)

    from jaxedit.checkpoint import save_params

    preset = configs.get(args.preset)
    if args.part == "pipeline":
        from checkpoints_convert.pipeline import convert_pipeline

        overrides = {k[5:]: v for k, v in vars(args).items() if k.startswith("path_") and v}
        try:
            out = convert_pipeline(
                args.src, args.dst, preset, dtype=_dtype(args.dtype), overrides=overrides, force=args.force,
                qwen=args.qwen,
            )  # fmt: skip
        except (ConversionError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote model folder {out}")
        return 0
    cfg = part_config(preset, args.part)
    if cfg is None:
        print(f"error: preset {preset.name} has no {args.part}", file=sys.stderr)
        return 2
    ignore = (lambda k: any(fnmatch.fnmatch(k, p) for p in args.ignore)) if args.ignore else None
    t0 = time.perf_counter()
    try:
        params = load_part(args.part, args.src, cfg, args.format, dtype=_dtype(args.dtype), ignore=ignore)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_params(args.dst, params, force=args.force)
    import jax

    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    print(
        f"wrote {args.part} {out} ({n / 1e9:.3f}B parameters, preset {preset.name}) in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
