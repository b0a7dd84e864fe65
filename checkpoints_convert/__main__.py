"""CLI: python -m checkpoints_convert transformer SRC DST --preset flux-kontext-dev [--dtype bfloat16]."""

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
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("transformer", help="a FLUX / FLUX Kontext transformer checkpoint -> Orbax")
    t.add_argument("src", help=".safetensors file, sharded folder with index, or diffusers transformer/ folder")
    t.add_argument("dst", help="output Orbax checkpoint directory")
    t.add_argument("--preset", required=True, help="model preset, e.g. flux-kontext-dev")
    t.add_argument("--format", choices=["bfl", "diffusers"], default=None, help="source layout (default: detect)")
    t.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None, help="default: keep the file's")
    t.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="skip source tensors matching this glob on purpose (repeatable); anything else unknown is an error",
    )
    t.add_argument("--force", action="store_true", help="overwrite DST")
    args = parser.parse_args(argv)

    from checkpoints_convert import ConversionError, load_transformer
    from jaxedit import configs
    from jaxedit.checkpoint import save_params

    preset = configs.get(args.preset)
    ignore = (lambda k: any(fnmatch.fnmatch(k, p) for p in args.ignore)) if args.ignore else None
    t0 = time.perf_counter()
    try:
        params = load_transformer(args.src, preset.transformer, args.format, dtype=_dtype(args.dtype), ignore=ignore)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_params(args.dst, params, force=args.force)
    import jax

    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    print(f"wrote {out} ({n / 1e9:.3f}B parameters, preset {preset.name}) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
