"""CLI: python -m checkpoints_convert PART SRC DST --preset NAME [--dtype bfloat16] [--format F] [--ignore GLOB].

PART is one of the model parts in `checkpoints_convert.LOADERS` (transformer, ...)."""

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
    from checkpoints_convert import LOADERS, ConversionError
    from jaxedit import configs

    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__)
    sub = parser.add_subparsers(dest="part", required=True)
    for part, (_, _, formats) in LOADERS.items():
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
    args = parser.parse_args(argv)

    from jaxedit.checkpoint import save_params

    preset = configs.get(args.preset)
    attr, loader, _ = LOADERS[args.part]
    cfg = getattr(preset, attr)
    if cfg is None:
        print(f"error: preset {preset.name} has no {attr}", file=sys.stderr)
        return 2
    ignore = (lambda k: any(fnmatch.fnmatch(k, p) for p in args.ignore)) if args.ignore else None
    t0 = time.perf_counter()
    try:
        params = loader(args.src, cfg, args.format, dtype=_dtype(args.dtype), ignore=ignore)
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
