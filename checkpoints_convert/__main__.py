"""Convert PyTorch safetensors checkpoints (BFL, diffusers, Step1X-Edit layouts) into jaxedit, or check them.

    python -m checkpoints_convert pipeline SRC DST --preset flux-kontext-dev   # a whole release -> model folder
    python -m checkpoints_convert transformer FILE DST --preset flux-kontext-dev  # one part -> Orbax checkpoint
    python -m checkpoints_convert check FILE --preset flux-kontext-dev         # names and shapes only
    python -m checkpoints_convert pipeline SRC DST --preset step1x-edit --qwen QWEN_FOLDER  # with Qwen2.5-VL
    python -m checkpoints_convert add-qwen MODEL_FOLDER QWEN_FOLDER  # Qwen2.5-VL into a Step1X-Edit folder
    python -m checkpoints_convert qwen-vl QWEN_FOLDER JUDGE_FOLDER  # a Qwen2.5-VL judge for `jaxedit eval`
    python -m checkpoints_convert seal MODEL_FOLDER   # record checksums in a folder written before they existed
    python -m checkpoints_convert pipeline SRC DST --preset flux-kontext-dev --quantize int8  # int8 DiT + T5
    python -m checkpoints_convert quantize MODEL_FOLDER DST --quantize int8   # an int8 copy of a model folder
    python -m checkpoints_convert clip-model SRC DST   # a transformers CLIPModel folder -> CLIP metrics folder

Parts: transformer, vae, t5, clip, qwen. Nothing is downloaded: point at files on your disk. (Installed, the
command is also `jaxedit-convert`.)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from jaxedit import presets
from jaxedit.options import QUANTIZE


def _dtype(name: str | None):
    if name is None:
        return None
    import ml_dtypes

    return {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[name]


def parser() -> argparse.ArgumentParser:
    from checkpoints_convert import formats, part_names

    p = argparse.ArgumentParser(
        prog="python -m checkpoints_convert",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = "{pipeline,add-qwen,qwen-vl,seal,check,quantize,clip-model," + ",".join(part_names()) + "}"
    sub = p.add_subparsers(dest="command", required=True, metavar=commands)
    preset_help = f"model preset: {', '.join(presets.names())}"
    dtypes = dict(choices=["bfloat16", "float32", "float16"], default=None, help="output dtype (default: the file's)")

    pp = sub.add_parser("pipeline", help="a whole FLUX(.1 Kontext) or Step1X-Edit release -> a jaxedit model folder")
    pp.add_argument("src", help="diffusers folder (model_index.json), or a folder with the BFL / Step1X files")
    pp.add_argument("dst", help="output jaxedit model folder")
    pp.add_argument("--preset", required=True, help=preset_help)
    pp.add_argument("--dtype", **dtypes)
    for name in ("transformer", "vae", "t5", "clip", "tokenizer", "tokenizer_2"):
        pp.add_argument(f"--{name.replace('_', '-')}", dest=f"path_{name}", default=None, help=f"path of the {name}")
    pp.add_argument("--qwen", default=None, help="Step1X-Edit: the Qwen2.5-VL-7B-Instruct folder to convert")
    pp.add_argument("--force", action="store_true", help="overwrite DST")
    quant_help = ("store the DiT's (and T5's) block weights as int8 or fp8 (e4m3) with per-channel scales: "
                  "about half the memory of bfloat16 (see the README)")  # fmt: skip
    pp.add_argument("--quantize", choices=QUANTIZE, default="none", help=quant_help)
    qz = sub.add_parser("quantize", help="a jaxedit model folder -> a copy with quantised DiT (and T5) weights")
    qz.add_argument("src", help="the jaxedit model folder")
    qz.add_argument("dst", help="output jaxedit model folder")
    qz.add_argument("--quantize", choices=["int8", "fp8"], default="int8", help="weight type (default int8)")
    qz.add_argument("--force", action="store_true", help="overwrite DST")

    cm = sub.add_parser(
        "clip-model",
        help="a transformers CLIPModel folder (openai/clip-vit-large-patch14) -> a "
        "CLIP folder for the editing metrics (params/, tokenizer/, clip.json)",
    )
    cm.add_argument("src", help="the transformers CLIPModel folder (config.json, model.safetensors, tokenizer and "
                    "preprocessor_config.json)")  # fmt: skip
    cm.add_argument("dst", help="output CLIP folder")
    cm.add_argument("--dtype", **dtypes)
    cm.add_argument("--force", action="store_true", help="overwrite DST")

    q = sub.add_parser("add-qwen", help="convert a Qwen2.5-VL folder into a Step1X-Edit model folder (qwen/)")
    q.add_argument("folder", help="the jaxedit Step1X-Edit model folder")
    q.add_argument("qwen", help="the transformers Qwen2.5-VL folder (config.json, safetensors, tokenizer, ...)")
    q.add_argument("--dtype", **dtypes)

    j = sub.add_parser("qwen-vl", help="a Qwen2.5-VL folder -> a judge folder for `jaxedit eval --judge`")
    j.add_argument("src", help="the transformers Qwen2.5-VL folder (config.json, safetensors, tokenizer, ...)")
    j.add_argument("dst", help="output judge folder")
    j.add_argument("--dtype", **dtypes)
    j.add_argument("--force", action="store_true", help="overwrite DST")
    sl = sub.add_parser("seal", help="record the checksums of a model folder's parts (or of one checkpoint)")
    sl.add_argument("folder", help="a jaxedit model folder or Orbax checkpoint written without checksums")

    c = sub.add_parser("check", help="check a checkpoint against a preset and the published releases (no tensor read)")
    c.add_argument("src", help=".safetensors file, sharded folder with its index, diffusers model folder, or a "
                   "manifest JSON ({\"tensors\": {name: shape}})")  # fmt: skip
    c.add_argument("--preset", required=True, help=preset_help)
    c.add_argument("--part", choices=part_names(), default=None, help="model part (default: from the tensor names)")
    c.add_argument("--format", default=None, help="source layout (default: from the tensor names)")

    for part in part_names():
        t = sub.add_parser(part, help=f"a {part} checkpoint (safetensors) -> Orbax")
        t.add_argument("src", help=".safetensors file, sharded folder with its index, or a diffusers model folder")
        t.add_argument("dst", help="output Orbax checkpoint directory")
        t.add_argument("--preset", required=True, help=preset_help)
        t.add_argument("--format", choices=formats(part), default=None, help="source layout (default: from the keys)")
        t.add_argument("--dtype", **dtypes)
        t.add_argument(
            "--ignore",
            action="append",
            default=[],
            metavar="GLOB",
            help="skip source tensors matching this glob on purpose (repeatable); anything else unknown is an error",
        )
        t.add_argument("--force", action="store_true", help="overwrite DST")
    return p


def check(args, preset) -> int:
    """Plan the part on names and shapes (file headers or a manifest), then compare with the published releases."""
    from checkpoints_convert import ShapeSource, detect_part, part_config, plan_part
    from checkpoints_convert.published import candidates, compare
    from checkpoints_convert.source import SafetensorsSource

    src = Path(args.src)
    if src.suffix == ".json" and src.is_file():
        try:
            source = ShapeSource(json.loads(src.read_text())["tensors"], str(src))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{src}: not a manifest ({{"tensors": {{name: shape}}}}): {e}') from None
    else:
        source = SafetensorsSource(src)
    part = args.part or detect_part(source.shapes)
    cfg = part_config(preset, part)
    if cfg is None:
        raise ValueError(f"preset {preset.name} has no {part}")
    the_plan = plan_part(part, source, cfg, args.format)
    n = sum(int(np.prod(s)) for s in source.shapes.values())
    print(f"ok: {len(source.shapes)} tensors ({n / 1e9:.3f}B values) of {source.describe()} map onto the "
          f"{preset.name} {part} ({the_plan.fmt} layout), every parameter filled once")  # fmt: skip
    for pub in candidates(part, the_plan.fmt, preset.name):
        diff = compare(source.shapes, pub.name)
        print(f"  vs the published {pub.name}: {diff.describe()}")
    return 0


def check_unsealed(path: Path, expected=None) -> None:
    """Load an unsealed checkpoint before its checksums are written (a seal vouches for what it covers): every
    array read, its names and shapes those `expected` (a tree of ShapeDtypeStructs) has, its float values
    finite. CheckpointError / ValueError naming the checkpoint and the parameter."""
    import jax

    from jaxedit import checkpoint, model_folder

    if expected is not None:
        model_folder.check_part(path, checkpoint.param_metadata(path), expected)
    params = checkpoint.load_params(path, device=jax.devices("cpu")[0], verify_checksums=False)
    for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        if a.dtype.kind in "fc" or a.dtype.name.startswith(("bfloat", "float")):  # (ml_dtypes' too)
            if not np.isfinite(a.astype(np.float32)).all():
                name = jax.tree_util.keystr(key, simple=True, separator="/")
                raise ValueError(f"{path}: parameter {name} holds NaN or inf: not sealed (a damaged or diverged "
                                 "checkpoint)")  # fmt: skip


def seal(folder: Path) -> int:
    """Seal every sub-folder of a model folder (or one checkpoint) that has no checksums yet, each checkpoint
    loaded first (`check_unsealed`): damage found is reported instead of sealed."""
    from jaxedit import checkpoint, families, model_folder

    expected = {}  # part -> the parameter tree its folder's description implies
    if checkpoint.is_checkpoint(folder):
        targets = [folder]
    elif model_folder.is_model_folder(folder):
        targets = [folder / d for d in model_folder.SUBFOLDERS if (folder / d).is_dir()]
        try:
            preset, stored = model_folder.read_description(folder), model_folder.read_quantized(folder)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        expected = {p: model_folder.expected_params(preset, p, stored.get(p)) for p in families.of(preset).parts
                    if getattr(preset, p) is not None and (folder / p).is_dir()}  # fmt: skip
    else:
        print(f"error: {folder} is neither a jaxedit model folder nor an Orbax checkpoint", file=sys.stderr)
        return 2
    for t in targets:
        if (t / checkpoint.CHECKSUMS).is_file():
            print(f"  {t}: already sealed, verifying")
            try:
                checkpoint.verify(t)
            except checkpoint.CheckpointError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            continue
        t0 = time.perf_counter()
        if checkpoint.is_checkpoint(t):
            try:
                check_unsealed(t, expected.get(t.name))
            except ValueError as e:  # CheckpointError is one
                print(f"error: {e}", file=sys.stderr)
                return 2
        n = len(checkpoint.seal(t))
        print(f"  {t}: {n} files sealed ({time.perf_counter() - t0:.1f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    target = getattr(args, "dst", None) or (args.folder if args.command in ("add-qwen", "seal") else None)
    if target is None:  # check: writes nothing
        return run(args)
    from jaxedit.locks import Busy, exclusive

    dst = Path(target).absolute()
    lock = dst.parent / f".{dst.name}.lock"  # one writer per destination: a lock file beside it while it writes
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644))  # (probe: the lock's own open may raise no more)
    except OSError as e:
        print(f"error: cannot write beside {target} ({e.strerror or e})", file=sys.stderr)
        return 2
    try:
        with exclusive(lock, f"{dst} is being written by another process", "wait for it to finish"):
            return run(args)
    except Busy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    """The command of parsed `args`."""
    from checkpoints_convert import ConversionError, load_part, part_config

    if args.command == "add-qwen":
        from checkpoints_convert.pipeline import add_qwen

        try:
            print(f"wrote {add_qwen(args.folder, args.qwen, dtype=_dtype(args.dtype)) / 'qwen'}")
            return 0
        except (ConversionError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "qwen-vl":
        from checkpoints_convert.judge import convert_judge

        try:
            convert_judge(args.src, args.dst, dtype=_dtype(args.dtype), force=args.force)
            return 0
        except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "seal":
        return seal(Path(args.folder))
    if args.command == "clip-model":
        from checkpoints_convert.clip_model import convert_clip_model

        try:
            convert_clip_model(args.src, args.dst, dtype=_dtype(args.dtype), force=args.force)
            return 0
        except (ConversionError, FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "quantize":
        from checkpoints_convert.pipeline import quantize_folder

        try:
            print(f"wrote model folder {quantize_folder(args.src, args.dst, args.quantize, force=args.force)}")
            return 0
        except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        preset = presets.get(args.preset)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            return check(args, preset)
        if args.command == "pipeline":
            from checkpoints_convert.pipeline import convert_pipeline

            overrides = {k[5:]: v for k, v in vars(args).items() if k.startswith("path_") and v}
            out = convert_pipeline(
                args.src, args.dst, preset, dtype=_dtype(args.dtype), overrides=overrides, force=args.force,
                qwen=args.qwen, quantize=args.quantize,
            )  # fmt: skip
            print(f"wrote model folder {out}")
            return 0
        cfg = part_config(preset, args.command)
        if cfg is None:
            raise ValueError(f"preset {preset.name} has no {args.command}")
        from jaxedit.checkpoint import is_checkpoint, prepare_destination

        what = "jaxedit (Orbax) checkpoint"
        prepare_destination(Path(args.dst).absolute(), force=args.force, replaceable=is_checkpoint, what=what)
        ignore = (lambda k: any(fnmatch.fnmatch(k, p) for p in args.ignore)) if args.ignore else None
        t0 = time.perf_counter()
        params = load_part(args.command, args.src, cfg, args.format, dtype=_dtype(args.dtype), ignore=ignore)
    except (ConversionError, FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jaxedit.checkpoint import save_params

    out = save_params(args.dst, params, force=args.force)
    import jax

    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    print(f"wrote {args.command} {out} ({n / 1e9:.3f}B parameters, preset {preset.name}) in "
          f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
