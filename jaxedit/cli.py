"""The `jaxedit` command (also `python -m jaxedit`): edit images, run batch jobs, train, plan.

    jaxedit edit --image in.png --prompt "make it snow" --out out.png [--model FOLDER]
    jaxedit edit --image person.png --image scene.png --prompt "put the person into the scene" --out out.png
    jaxedit batch --manifest edits.jsonl --out DIR [--model FOLDER] [--batch-size 4]
    jaxedit train --config kontext_dev_lora --set model=FOLDER --set data.path=DATA
    jaxedit precompute --model FOLDER --data DATA --out CACHE
    jaxedit plan --task train --target v5p-8 --resolution 1024
    jaxedit data pack --from parquet 'gs://b/edits/*.parquet' --out gs://b/packed   (also: data info, data verify)
    jaxedit eval --benchmark DIR --judge JUDGE --out OUT [--model FOLDER] [--limit N] [--batch-size 4]
    jaxedit calibrate-cache --image a.png --prompt "..." --image b.png --prompt "..." --threshold 0.08 --out s.json

Without --model the shipped default model is used. Real checkpoints are converted into model
folders with `jaxedit-convert` (`python -m checkpoints_convert`). Bad input (a missing image, an
empty prompt, a folder that is not a model) stops with one line naming it, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from jaxedit import DEFAULT_MODEL
from jaxedit.options import QUANTIZE, REFERENCE_IDS, check_option

COMMANDS = {
    "edit": "edit one image",
    "batch": "edit every line of a JSONL manifest (resumable; bad items fail alone)",
    "train": "train or fine-tune from a config (a name of the shipped configs or a file)",
    "precompute": "cache a dataset's text embeddings and VAE latents for training",
    "plan": "compile a full-size step ahead of time: per-device memory, FLOPs, time estimates",
    "data": "training data as record shards: pack (a folder, Parquet or tar shards), info, verify",
    "eval": "edit and judge a benchmark (GEdit-Bench, ImgEdit, pairs): tables and an HTML report (resumable)",
    "calibrate-cache": "record which steps a first-block cache skips on a few edits: a --cache schedule file",
}


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr, exit code 2 (bad input: nothing was done)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def model_options(p: argparse.ArgumentParser) -> None:
    """The options `edit` and `batch` share: which model, and its sampling settings."""
    p.add_argument("--model", default=None, help="jaxedit model folder (default: the shipped default model)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument(
        "--guidance", type=float, default=None, help="guidance value: FLUX's embedded guidance, Step1X's CFG weight"
    )
    p.add_argument(
        "--true-cfg-scale",
        type=float,
        default=None,
        help="FLUX Kontext: true CFG scale, 1 = off (default: the model's)",
    )
    p.add_argument(
        "--negative-prompt", default=None, help="FLUX Kontext: true CFG's negative prompt (default: the model's)"
    )
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="transformer/text dtype (default: the model's)"
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="FLUX Kontext: merge a LoRA (diffusers/PEFT, kohya, BFL/ai-toolkit or XLabs .safetensors) into the "
        "weights with SCALE (default 1); repeatable; applied after the model folder's own (pipeline.loras)",
    )
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="int8 / fp8 (e4m3) weights for the DiT (and FLUX's T5), quantised as they load: about half "
                   "the memory of bfloat16 (default: the model folder's; see the README)")  # fmt: skip
    p.add_argument("--text-on-cpu", action="store_true",
                   help="FLUX Kontext: keep T5 and CLIP in host memory and run them on the CPU, so the "
                   "accelerator holds only the DiT and the VAE (with --quantize int8: a 16 GB chip)")  # fmt: skip
    p.add_argument("--mesh", default=None,
                   help="where the model runs on this host's devices: auto (the default, unless the model folder's "
                   "option says otherwise: replicated data parallel when a chip holds the weights, else the smallest "
                   "group of chips that does, FSDP-sharded, data parallel across groups; or the choice of `jaxedit "
                   "plan --mesh auto`), or axis sizes such as data=8, fsdp=4, data=2,fsdp=4, "
                   "fsdp=2,tensor=2")  # fmt: skip
    p.add_argument("--keep-size", action="store_true", help="keep the input size (floored to 16), do not resize it")
    p.add_argument("--reference-ids", choices=REFERENCE_IDS, default=None,
                   help="FLUX Kontext, several images: their sizes and position ids (default community: diffusers' "
                   "community multi-image pipeline, every image resized to the first one's size; community-own-sizes: "
                   "its ids, each image at its own size; offset, index: ComfyUI's, each at its own size)")  # fmt: skip
    p.add_argument("--reference-tokens", type=positive_int, default=None,
                   help="FLUX Kontext: scale an item's reference images together to at most this many tokens "
                   "(4096: one 1024x1024 image; default: as --reference-ids sizes them)")  # fmt: skip
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="FLUX Kontext: refuse an item whose target + reference tokens exceed this")  # fmt: skip
    p.add_argument(
        "--qwen", default=None, help="Step1X-Edit: a model folder whose converted Qwen2.5-VL to use (default: its own)"
    )
    p.add_argument("--size-level", type=positive_int, default=None, help="Step1X-Edit: working area size_level^2 (512)")
    p.add_argument("--scheduler", default=None, metavar="NAME|KEY=VALUE,...",
                   help="the sampling schedule (default the model's). FLUX.1 Kontext / Step1X-Edit: default (FLUX's "
                   "resolution shift), linear (no shift), and/or shift=on|off, base_shift=, max_shift=, e.g. "
                   "shift=off. Qwen-Image-Edit: lightning (the Lightning 4-/8-step LoRAs': with --steps 4 or 8 and "
                   "--true-cfg-scale 1), default (Qwen-Image's), and/or fields of diffusers' scheduler_config.json "
                   "over it, e.g. lightning,shift_terminal=0.02 or base_shift=ln(3),max_shift=ln(3)")  # fmt: skip
    p.add_argument("--cache", default=None, metavar="fbc:THRESHOLD|tea:THRESHOLD|schedule:FILE|off",
                   help="step caching in the sampling loop (jaxedit.step_cache; default the model's, else off): "
                   "fbc:0.08 reuses the blocks' residual when the first block changes less than 8%%; tea:0.4 "
                   "TeaCache's accumulated change of the first block's modulated input; schedule:FILE a calibrated "
                   "schedule")  # fmt: skip


def load_pipeline(args):
    """The model folder's pipeline with the command line's settings; SystemExit (one line) on bad input."""
    from jaxedit import families
    from jaxedit.model_folder import ModelFolder
    from jaxedit.pipelines.auto import load_pipeline as load

    path = Path(args.model) if args.model else DEFAULT_MODEL
    check_flags(args)
    if getattr(args, "cache", None) is not None:  # a schedule file read before anything loads
        from jaxedit import step_cache

        try:
            step_cache.parse(args.cache)
        except ValueError as e:
            fail(f"--cache: {e}")
    try:
        folder = ModelFolder.open(path)  # jaxedit.json read and checked once; every later step gets this value
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    preset, options = folder.preset, folder.options
    if options.get("random_weights"):
        print(f"note: {path} holds RANDOM weights (a placeholder model): the output shows the pipeline runs, "
              "it is not a real edit", file=sys.stderr)  # fmt: skip
    family = families.of(preset)
    try:  # the flags that apply to the folder's family, checked (and LoRA files read) before it loads
        kw = family.load_options(args, preset)
    except ValueError as e:
        fail(str(e))
    kw |= {"quantize": args.quantize} if args.quantize else {}
    kw |= {"mesh": args.mesh} if args.mesh else {}
    try:
        pipe = load(folder, dtype=args.dtype, **kw)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if len(getattr(pipe, "devices", ())) > 1:
        print(f"note: {len(pipe.devices)} devices, mesh {pipe.mesh_text}", file=sys.stderr)
    for lora, scale, merged in getattr(pipe, "loras", []):
        print(f"note: LoRA {lora.describe()} at scale {scale:g}{'' if merged else ', applied per call'}",
              file=sys.stderr)  # fmt: skip
    try:
        family.configure(pipe, args)
        if getattr(args, "cache", None) is not None:
            pipe.set_cache(args.cache)
    except ValueError as e:
        fail(str(e))
    return pipe


FLAGS = {"steps": "--steps", "guidance": "--guidance", "true_cfg_scale": "--true-cfg-scale",
         "negative_prompt": "--negative-prompt", "reference_tokens": "--reference-tokens",
         "max_tokens": "--max-tokens", "size_level": "--size-level", "mesh": "--mesh", "cache": "--cache"}  # fmt: skip


def check_flags(args) -> None:
    """The model options given as flags, checked as a model folder's are (`jaxedit.options`); one line if not."""
    for name, flag in FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            try:
                check_option("max_image_tokens" if name == "max_tokens" else name, value, flag)
            except ValueError as e:
                fail(str(e))


def sampling_defaults(args, pipe) -> dict:
    """Steps and guidance of an edit: the flags, else the model's (--guidance 0 is kept)."""
    return {
        "steps": pipe.default_steps if args.steps is None else args.steps,
        "guidance": pipe.default_guidance if args.guidance is None else args.guidance,
    }


def model_identity(args, pipe) -> str:
    """What, besides an item's own inputs, decides a batch item's output: the model folder (`fingerprint`:
    no weights read) and the sampling options. Part of each result's key: a rerun with another model reruns."""
    import json

    from jaxedit.model_folder import ModelFolder, fingerprint

    options = {k: getattr(args, k) for k in ("dtype", "keep_size", "size_level")}
    refs = {k: getattr(pipe, k, None) for k in ("reference_ids", "reference_tokens")}
    # reference_ids always: "community" resizes mixed-size references to the first one's since 2026-12-07, so
    # results made under its earlier meaning (now "community-own-sizes") are not trusted
    options |= {k: v for k, v in refs.items() if v is not None}
    options |= {k: getattr(pipe, k, None) for k in ("true_cfg_scale", "negative_prompt")}  # flags or the folder's
    loras = pipe.lora_identity() if hasattr(pipe, "lora_identity") else []  # the folder's and --lora
    options |= {"loras": loras} if loras else {}  # (absent without LoRAs: earlier results keep their keys)
    options |= {"quantized": pipe.quantized} if getattr(pipe, "quantized", None) else {}  # stored or at load
    options |= {"text_on_cpu": True} if getattr(args, "text_on_cpu", False) else {}
    if getattr(args, "scheduler", None) is not None:  # the schedule the flag made (absent without it)
        options |= {"scheduler": pipe.scheduler.to_dict()}
    cache = getattr(pipe, "cache", None)  # the flag's or the folder's step cache (absent when off)
    options |= {"cache": cache.text} if cache is not None else {}
    opened = getattr(pipe, "folder", None)  # the folder the pipeline was loaded from: its jaxedit.json not re-read
    path = Path(args.model) if args.model else DEFAULT_MODEL
    model = fingerprint(opened if isinstance(opened, ModelFolder) else path)
    qwen = fingerprint(args.qwen) if args.qwen else None
    return json.dumps({"model": model, "qwen": qwen, **options}, sort_keys=True)


def editor_options(args) -> str:
    """The editing options as given (`model_options`' flags, the model folder's and --qwen's fingerprints, the
    bytes of the files flags name: LoRAs, a cache schedule) and jaxedit's version: what `model_identity` and
    `sampling_defaults` follow from, known without loading the model (`jaxedit eval` reruns compare it)."""
    import json

    from jaxedit import __version__
    from jaxedit.model_folder import fingerprint
    from jaxedit.pipelines.batch import file_digest

    p = argparse.ArgumentParser(add_help=False)
    model_options(p)
    flags = {k: getattr(args, k, None) for k in vars(p.parse_args([])) if k != "mesh"}  # (placement: same edits)
    files = [x if Path(x).is_file() else x.rpartition(":")[0] for x in args.lora]
    cache = args.cache or ""
    files += [cache.partition(":")[2]] if cache.startswith("schedule:") else []
    digests = [file_digest(f) if Path(f).is_file() else None for f in files]
    model = fingerprint(Path(args.model) if args.model else DEFAULT_MODEL)
    qwen = fingerprint(args.qwen) if args.qwen else None
    return json.dumps([__version__, flags, model, qwen, digests], sort_keys=True)


def check_output(dst: Path) -> None:
    """ItemError unless an image can be written at `dst` (checked before the model is loaded and run)."""
    from jaxedit.pipelines.batch import ItemError

    if dst.is_dir():
        raise ItemError(f"--out {dst} is a folder: give a file path ending in .png")
    if dst.suffix.lower() != ".png":
        raise ItemError(f"--out {dst}: the output is a PNG file, end its name with .png")
    parent = next((p for p in dst.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ItemError(f"--out {dst}: cannot write in {parent}")


def edit_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxedit edit", description="Edit one image with a jaxedit model folder.")
    p.add_argument("--image", required=True, action="append",
                   help="input image (any format Pillow reads); repeat it for several reference images")  # fmt: skip
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--width", type=positive_int, default=None, help="output width (default: the reference's)")
    p.add_argument("--height", type=positive_int, default=None, help="output height (default: the reference's)")
    model_options(p)
    args = p.parse_args(argv)
    from jaxedit.pipelines.batch import ItemError, NonFiniteError, load_image, parse_item

    # the batch path's validation of an item (prompt, seed, steps, guidance, sizes), before any work
    fields = {"images": args.image, "prompt": args.prompt, "seed": args.seed}
    fields |= {"width": args.width, "height": args.height}
    fields |= {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None}
    dst = Path(args.out)
    try:
        parse_item(fields, 0, {"steps": 1, "guidance": 0.0}, Path.cwd())
        check_output(dst)
        images = [load_image(x) for x in args.image]
    except ItemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pipe = load_pipeline(args)
    t1 = time.perf_counter()
    try:
        if len(images) > 1 and not getattr(pipe, "several_references", False):
            raise ValueError(f"--image: this model takes one input image, got {len(images)}")
        prepared = pipe.prepare(images if len(images) > 1 else images[0], args.width, args.height)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = sampling_defaults(args, pipe)
    try:
        out = pipe.generate([prepared], [args.prompt], [args.seed], guidance=[d["guidance"]], steps=d["steps"])[0]
    except NonFiniteError:
        print(f"error: the edit came out with NaN or inf values (a LoRA, the model's weights or a setting "
              f"overflowed): {dst} not written", file=sys.stderr)  # fmt: skip
        return 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    from jaxedit.staged import staged_file

    with staged_file(dst) as tmp:  # this process's temporary: never another run's
        out.save(tmp, format="PNG")
    t2 = time.perf_counter()
    print(f"wrote {dst} ({out.width}x{out.height}); load {t1 - t0:.1f}s, edit {t2 - t1:.1f}s (compile included)")
    return 0


def calibrate_cache_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="jaxedit calibrate-cache",
        description="Run a first-block cache on a few edits "
        "(one at a time) and write the steps it skipped as a schedule for --cache schedule:FILE.",
    )
    p.add_argument("--image", required=True, action="append", help="an input image; repeat it, one per edit")
    p.add_argument("--prompt", required=True, action="append", help="the edit instructions, one per --image")
    p.add_argument("--threshold", type=float, required=True, help="the cache's threshold (e.g. 0.08)")
    p.add_argument("--signal", choices=("fbc", "tea"), default="fbc",
                   help="the signal calibrated: fbc (first-block cache, default) or tea (TeaCache)")  # fmt: skip
    p.add_argument(
        "--agree",
        type=float,
        default=1.0,
        help="a step reuses when at least this share of the edits reused it (default 1: all)",
    )
    p.add_argument("--out", required=True, help="the schedule's JSON file")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first edit (the others: +1 each)")
    model_options(p)
    args = p.parse_args(argv)
    from jaxedit import step_cache
    from jaxedit.pipelines.batch import ItemError, load_image

    if len(args.image) != len(args.prompt):
        fail(f"{len(args.image)} --image but {len(args.prompt)} --prompt: one prompt per image")
    if not (0 < args.agree <= 1):
        fail(f"--agree {args.agree}: a share in (0, 1]")
    try:
        step_cache.CacheSpec(threshold=args.threshold, signal=args.signal)
        images = [load_image(x) for x in args.image]
    except (ItemError, ValueError) as e:
        fail(str(e))
    pipe = load_pipeline(args)
    d = sampling_defaults(args, pipe)
    seeds = [args.seed + i for i in range(len(images))]
    try:
        data = step_cache.calibrate(pipe, images, args.prompt, seeds, args.threshold, steps=d["steps"],
                                    guidance=d["guidance"], agree=args.agree, out=args.out,
                                    signal=args.signal)  # fmt: skip
    except ValueError as e:
        fail(str(e))
    print(f"wrote {args.out}: {data['calls_saved']} of {data['steps']} steps reuse "
          f"({''.join('x' if s else '.' for s in data['skips'])})")  # fmt: skip
    return 0


def batch_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="jaxedit batch",
        description='Edit every line of a JSONL manifest: {"image": path, "prompt": str, optional "id", '
        '"seed", "steps", "guidance", "width", "height"} ("images": [path, ...]: several reference images). '
        "Writes DIR/<id>.png and DIR/results.jsonl; "
        "a bad item fails alone, a rerun skips what is done (same inputs, same model) and redoes what changed; "
        "exit code 1 if any item failed.",
    )
    p.add_argument("--manifest", required=True, help="JSONL file, one edit per line")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=positive_int, default=1, help="items per generated batch (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    model_options(p)
    args = p.parse_args(argv)
    from jaxedit.pipelines.batch import OutputBusy, ProgramFault, check_output_dir, output_lock, run_job

    if not Path(args.manifest).is_file():
        print(f"error: manifest not found: {args.manifest}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:  # the output folder, then its lock, before the model loads
        check_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        print(f"error: {e if isinstance(e, ValueError) else f'--out {out}: {e.strerror or e}'}", file=sys.stderr)
        return 2
    try:
        with output_lock(out):
            pipe = load_pipeline(args)
            counts = run_job(pipe, Path(args.manifest), out, batch_size=args.batch_size,
                             defaults=sampling_defaults(args, pipe), model=model_identity(args, pipe),
                             progress=not args.no_progress, locked=True)  # fmt: skip
    except (ProgramFault, OutputBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped (already done); "
          f"results in {Path(args.out) / 'results.jsonl'}")  # fmt: skip
    return 1 if counts["failed"] else 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="jaxedit eval",
        description="Edit every item of a benchmark copy on disk (GEdit-Bench's Parquet + viescore/vie_prompts.py, "
        "ImgEdit Basic's basic_edit.json + prompts.json, or a pairs folder's benchmark.jsonl), judge each edit, write "
        "OUT/results.jsonl, OUT/summary.md / .json (the benchmark's aggregation) and OUT/report.html. Resumable: a "
        "rerun skips edits and judgements already done with the same inputs.",
    )
    p.add_argument("--benchmark", required=True, metavar="DIR", help="the benchmark's folder")
    p.add_argument("--judge", required=True, metavar="FOLDER|MODULE:FUNCTION",
                   help="a Qwen2.5-VL judge folder (python -m checkpoints_convert qwen-vl SRC OUT) or MODULE:FUNCTION, "
                   "a Python judge (e.g. shapes:score_edit)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--limit", type=positive_int, metavar="N", default=None, help="the first N items only")
    p.add_argument("--batch-size", type=positive_int, metavar="N", default=1, help="edits per batch (1)")
    p.add_argument(
        "--seed", type=int, metavar="N", default=0, help="seed of the first item without its own (the others: +1 each)"
    )
    p.add_argument("--language", choices=["en", "cn"], default=None, help="GEdit-Bench: one language only")
    p.add_argument("--clip", default=None, metavar="FOLDER",
                   help="a converted CLIP folder (python -m checkpoints_convert clip-model SRC OUT): CLIP-I (edit "
                   "vs target) and CLIP-T (edit vs instruction) too; L1 to the target comes without it")  # fmt: skip
    p.add_argument("--judge-batch", type=positive_int, default=None, metavar="N",
                   help="judge prompts per generate call, and items judged (and scored by CLIP) per step "
                   "(default: --batch-size)")  # fmt: skip
    p.add_argument("--judge-mesh", default="auto", metavar="SPEC",
                   help="where a judge folder runs on this host's devices: axis sizes such as tensor=4 or data=2 "
                   "(the first that many devices), or auto (default: replicated when a chip holds the weights, "
                   "else tensor-parallel over the fewest chips that do; data rows up to --judge-batch)")  # fmt: skip
    p.add_argument(
        "--judge-max-tokens", type=positive_int, metavar="N", default=512, help="judge answer length cap (512)"
    )
    p.add_argument("--judge-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="a judge folder's weights and compute dtype (default bfloat16)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    model_options(p)
    args = p.parse_args(argv)
    from jaxedit.evaluation import benchmarks, judges
    from jaxedit.evaluation.run import LoadFailed, edit_all, judge_all
    from jaxedit.parallel import placement
    from jaxedit.pipelines.batch import OutputBusy, ProgramFault, check_output_dir, output_lock

    try:
        placement.parse(args.judge_mesh)
    except ValueError as e:
        fail(f"--judge-mesh {args.judge_mesh}: {e}")
    out = Path(args.out)
    try:
        check_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        bench = benchmarks.read(args.benchmark, out / "inputs")
    except (ValueError, OSError) as e:
        fail(str(e) if isinstance(e, ValueError) else f"--out {out}: {e.strerror or e}")
    if args.language:
        bench.items = [it for it in bench.items if it.language in (None, args.language)]
    bench.items = bench.items[: args.limit] if args.limit else bench.items
    if Path(args.judge).is_dir() and bench.kind not in judges.RECORDS:
        fail(f"--judge {args.judge}: a vision-language judge needs a benchmark with judge prompts (GEdit-Bench, "
             f"ImgEdit), {args.benchmark} is a {bench.kind} benchmark")  # fmt: skip
    try:  # checked now (folder, tokenizer, mesh); the weights are read once the edits are done
        judge = judges.open_judge(args.judge, max_new_tokens=args.judge_max_tokens, dtype=args.judge_dtype,
                                  batch_size=args.judge_batch or args.batch_size, mesh=args.judge_mesh,
                                  **({"weights": False} if Path(args.judge).is_dir() else {}))  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    clip_id = None
    if args.clip:  # checked now, loaded when judging begins
        from jaxedit import clip_folder
        from jaxedit.model_folder import fingerprint

        try:
            clip_folder.read(args.clip)
        except (FileNotFoundError, ValueError) as e:
            fail(f"--clip {args.clip}: {e}")
        clip_id = fingerprint(args.clip)

    def open_pipe():
        pipe = load_pipeline(args)
        return pipe, sampling_defaults(args, pipe), model_identity(args, pipe)

    try:  # edit everything, release the editing model, then judge: never both in device memory
        with output_lock(out):
            counts = edit_all(open_pipe, bench, out, batch_size=args.batch_size, seed=args.seed,
                              options=editor_options(args), progress=not args.no_progress)  # fmt: skip
            result = judge_all(judge, bench, out, counts, batch_size=args.batch_size, clip=args.clip, clip_id=clip_id,
                               judge_batch=args.judge_batch)  # fmt: skip
    except (ProgramFault, OutputBusy, LoadFailed) as e:
        fail(str(e))
    from jaxedit.evaluation.report import markdown

    print(markdown(result["tables"]))
    print(f"{result['judged']} judged, {result['unparsed']} unparsed, {result['failed']} failed (not edited); "
          f"{out / 'summary.md'}, {out / 'report.html'}")  # fmt: skip
    return 1 if result["failed"] else 0


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="jaxedit train", description="Train a FLUX.1 Kontext / Step1X-Edit editing model (or its VAE)."
    )
    p.add_argument("--config", required=True, help="a config file defining get_config(), or a shipped config's name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.path=/d")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from jaxedit.parallel.distributed import initialize_from_env
    from jaxedit.train.config import load_config

    initialize_from_env()
    from jaxedit.train import loop, vae

    try:  # the config, the model folder and the settings against it: before any work
        cfg = load_config(args.config, args.set)
        (vae if isinstance(cfg, vae.VAETrainConfig) else loop).check_run(cfg)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if isinstance(cfg, vae.VAETrainConfig):
        vae.train_vae(cfg)
    else:
        loop.train(cfg)
    return 0


def precompute_main(argv: list[str]) -> int:
    from jaxedit.train.precompute import main

    return main(argv, prog="jaxedit precompute")


def plan_main(argv: list[str]) -> int:
    from jaxedit.plan import main

    return main(argv, prog="jaxedit plan")


def data_main(argv: list[str]) -> int:
    from jaxedit.data.command import main

    return main(argv, prog="jaxedit data")


MAINS = {"edit": edit_main, "batch": batch_main, "train": train_main, "precompute": precompute_main, "plan": plan_main,
         "data": data_main, "calibrate-cache": calibrate_cache_main, "eval": eval_main}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in MAINS:
        lines = [__doc__.split("\n\n")[0], "", "commands:"]
        lines += [f"  {name:<11} {what}" for name, what in COMMANDS.items()]
        lines += ["", "`jaxedit <command> --help` for a command's options; `jaxedit-convert --help` to convert "
                  "real checkpoints (FLUX.1 Kontext, Step1X-Edit) into model folders."]  # fmt: skip
        known = not argv or argv[0] in ("-h", "--help")
        print("\n".join(lines), file=sys.stdout if known else sys.stderr)
        if not known:
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if known else 2
    return MAINS[argv[0]](argv[1:])
