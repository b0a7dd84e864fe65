"""Convert a whole release on disk into a jaxedit model folder in one go (what differs by family: its converter,
`checkpoints_convert.family`).

Sources:
  - a diffusers folder: model_index.json, transformer/, vae/, text_encoder/ (CLIP),
    text_encoder_2/ (T5), tokenizer/, tokenizer_2/;
  - a BFL-style folder: the DiT file (e.g. flux1-kontext-dev.safetensors) and ae.safetensors
    at the top, plus text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ folders;
  - either, with any part pointed at explicitly (`overrides`);
  - a Step1X-Edit release: `step1x-edit-i1258.safetensors` (DiT + connector) and
    `vae.safetensors` at the top; its Qwen2.5-VL-7B-Instruct folder (`qwen=`, a transformers folder:
    config.json, safetensors, tokenizer, preprocessor_config.json) is converted too, into `qwen/`
    (weights) and `qwen_processor/` (tokenizer, image processor and chat template files).
Every part is located and checked against the preset (names and shapes, from the file
headers) before any tensor is converted: a missing or inconsistent part fails first,
naming what is wrong. See `jaxedit.model_folder` for the output layout.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from checkpoints_convert import ConversionError, family, open_part, part_names
from checkpoints_convert.mapping import convert, unflatten
from checkpoints_convert.source import SafetensorsSource
from jaxedit.configs import Preset
from jaxedit.model_folder import TOKENIZERS, write_description


def _classify_top_files(src: Path, skip=()) -> dict[str, Path]:
    """BFL layout: which top-level .safetensors is the DiT and which the VAE (from their keys).
    Parts in `skip` (given explicitly) are not looked for."""
    found: dict[str, Path] = {}
    for f in sorted(src.glob("*.safetensors")):
        keys = SafetensorsSource(f).shapes
        if any("double_blocks." in k for k in keys):
            part = "transformer"
        elif "encoder.conv_in.weight" in keys or "decoder.conv_out.weight" in keys:
            part = "vae"
        else:
            continue
        if part in skip:
            continue
        if part in found:
            raise ConversionError(f"{src}: two {part} checkpoints ({found[part].name}, {f.name}); pick one explicitly")
        found[part] = f
    return found


def locate(src: str | Path, preset: Preset, overrides: dict[str, str | Path] | None = None) -> dict[str, Path]:
    """Paths of every part the preset needs (checkpoints by part name, tokenizers by folder name)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    overrides = {k: Path(v) for k, v in (overrides or {}).items() if v}
    conv = family.of(preset)
    needed, dirs = conv.release_parts(preset, part_names()), conv.diffusers_dirs
    if (src / "model_index.json").is_file():
        paths = {p: src / dirs[p] for p in needed}
    else:
        top = _classify_top_files(src, skip=set(overrides))
        paths = {p: top.get(p, src / dirs[p]) for p in needed}
    paths |= {name: src / d for name, d in conv.release_folders(preset).items()}
    for p in needed:
        if getattr(preset, p) is not None and p in TOKENIZERS:
            paths[TOKENIZERS[p]] = src / TOKENIZERS[p]
    paths.update(overrides)
    missing = [f"{name} ({path})" for name, path in paths.items() if not path.exists()]
    if missing:
        raise FileNotFoundError(f"{src}: missing {', '.join(missing)}")
    return paths


def convert_pipeline(
    src: str | Path,
    dst: str | Path,
    preset: Preset,
    *,
    dtype: Any = None,
    overrides: dict[str, str | Path] | None = None,
    force: bool = False,
    qwen: str | Path | None = None,
    quantize: str | None = None,
    log=print,
) -> Path:
    """Check every part, then convert them one by one into the model folder `dst`.

    Nothing at `dst` is touched until the new folder is complete: the destination is checked first (exists
    without force, not a model folder, not writable: one line in a second), then every part's headers,
    dtypes and tied/fixed tensors; the folder is written beside as .DST.new (each part sealed with its
    checksums) and renamed over `dst` at the end (a cut swap is finished by the next run).
    qwen: Step1X-Edit's Qwen2.5-VL folder (transformers layout), converted into qwen/ + qwen_processor/ (a
    further source of the family's converter: `checkpoints_convert.family.FamilyConverter.inputs`).
    quantize: "int8" / "fp8": the DiT's and T5's block kernels stored quantised (`jaxedit.quant`), recorded in
    jaxedit.json as "quantized"."""
    from jaxedit import quant
    from jaxedit.checkpoint import prepare_destination, recover_dir, save_params, seal
    from jaxedit.model_folder import is_model_folder
    from jaxedit.staged import staged_dir

    quantize = quant.check_mode(quantize)
    dst = Path(dst).absolute()
    recover_dir(dst, complete="jaxedit.json")
    prepare_destination(dst, force=force, replaceable=is_model_folder, what="jaxedit model folder")
    conv = family.of(preset)
    inputs = conv.inputs(preset, {k: v for k, v in {"qwen": qwen}.items() if v is not None})
    paths = locate(src, preset, overrides)
    opened = {}  # every part checked before any is converted
    for part in conv.release_parts(preset, part_names()):
        opened[part] = open_part(part, paths[part], conv.release_config(preset, part, paths))
    for part, (path, cfg) in conv.input_sources(inputs).items():
        opened[part] = open_part(part, path, cfg)
    log(f"checked {', '.join(f'{p} ({o[1].fmt})' for p, o in opened.items())} against preset {preset.name}")
    with staged_dir(dst) as new:  # .DST.new, renamed over dst once complete
        for part, (source, the_plan) in opened.items():
            t0 = time.perf_counter()
            flat = convert(the_plan, source.read, dtype=dtype, source_dtype=source.dtype)
            quantized = quantize if part in quant.RULES else None
            save_params(new / part, unflatten(quant.quantize_flat(part, flat, quantized)))
            del flat
            note = f", {quantized} weights" if quantized else ""
            log(f"  {part}: {source.describe()} -> {dst / part}{note} ({time.perf_counter() - t0:.1f}s)")
        for part, folder in TOKENIZERS.items():
            if part in opened:
                shutil.copytree(paths[folder], new / folder)
                seal(new / folder)
        extra = conv.write_extra(new, preset, inputs, paths)
        if quantize:
            extra["quantized"] = {p: quantize for p in opened if p in quant.RULES}
        write_description(new, preset, extra=extra)
    for note in conv.notes(dst, preset, inputs):
        log(note)
    return dst


def add_qwen(folder: str | Path, qwen: str | Path, *, dtype: Any = None, log=print) -> Path:
    """Convert a transformers Qwen2.5-VL folder into an existing model folder of a family that takes one
    (Step1X-Edit: `checkpoints_convert.step1x.Step1XConverter.add_qwen`)."""
    from jaxedit.model_folder import read_description

    folder = Path(folder)
    preset = read_description(folder)
    return family.of(preset).add_qwen(folder, Path(qwen), preset, dtype=dtype, log=log)


def quantize_folder(src: str | Path, dst: str | Path, mode: str, *, force: bool = False, log=print) -> Path:
    """A copy of the jaxedit model folder `src` at `dst` whose DiT (and T5) block kernels are stored quantised
    (`jaxedit.quant`), recorded in jaxedit.json as "quantized"; the other parts are copied as they are (every
    part verified against its seal first). Written beside as .DST.new and renamed into place."""
    from jaxedit import quant
    from jaxedit.checkpoint import prepare_destination, recover_dir, save_params, verify_or_note
    from jaxedit.model_folder import (
        SUBFOLDERS,
        check_complete,
        is_model_folder,
        quantized_on_host,
        read_description,
        read_json,
        read_quantized,
        write_json,
    )
    from jaxedit.staged import staged_dir

    mode = quant.check_mode(mode)
    if mode is None:
        raise ValueError("quantize: give int8 or fp8")
    src, dst = Path(src).absolute(), Path(dst).absolute()
    preset = read_description(src)
    check_complete(src, preset)
    if stored := read_quantized(src):
        raise ValueError(f"{src} is stored quantised already ({stored})")
    if src == dst or dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: write the quantised copy to another folder (it is {src}, or a link to it)")
    links_inside(src)  # ValueError naming a link that leaves the folder
    recover_dir(dst, complete="jaxedit.json")
    prepare_destination(dst, force=force, replaceable=is_model_folder, what="jaxedit model folder")
    parts = [p for p in SUBFOLDERS if (src / p).is_dir()]
    for p in parts:
        verify_or_note(src / p)
    with staged_dir(dst) as new:  # .DST.new (a partial copy is never left behind), renamed over dst when complete
        for item in sorted(f for f in src.iterdir() if not f.name.startswith(".") and f.name != "jaxedit.json"):
            if item.name in quant.RULES and item.name in parts:  # (read through a link inside the folder)
                t0 = time.perf_counter()
                save_params(new / item.name, unflatten(quantized_on_host(item, item.name, mode)))
                log(f"  {item.name}: {mode} weights -> {dst / item.name} ({time.perf_counter() - t0:.1f}s)")
            elif item.is_symlink():  # a link inside the folder: copied as the link it is
                os.symlink(os.readlink(item), new / item.name)
            elif item.is_dir():  # the other parts, tokenizers, LoRA files the folder's options name, ...
                shutil.copytree(item, new / item.name, symlinks=True)
            else:
                shutil.copy2(item, new / item.name)
        desc = read_json(src)
        write_json(new / "jaxedit.json", desc | {"quantized": {p: mode for p in parts if p in quant.RULES}})
    return dst


def links_inside(folder: Path) -> set[Path]:
    """The symbolic links under `folder` (none followed), each checked to lead inside it: ValueError naming the
    first that leads out (its copy would not be the folder's, and following it could copy the whole disk)."""
    root, out = folder.resolve(), set()
    for d, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = Path(d) / name
            if p.is_symlink():
                if not p.resolve().is_relative_to(root):
                    raise ValueError(f"{p} is a link to {os.readlink(p)}, outside {folder}: copy what it names into "
                                     "the folder, or remove it")  # fmt: skip
                out.add(p)
    return out
