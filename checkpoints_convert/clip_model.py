"""A transformers CLIPModel folder (openai/clip-vit-large-patch14: config.json, model.safetensors, tokenizer files,
preprocessor_config.json) -> a converted CLIP model folder (`jaxedit.clip_folder`) for the editing metrics.

    python -m checkpoints_convert clip-model SRC_FOLDER OUT_FOLDER [--dtype float32] [--force]

The key table is the library's (`jaxedit.names.clip_model`), strict both ways; `position_ids` buffers that older
transformers saved are checked (arange), not loaded. Everything is checked (config, tokenizer and preprocessor
files, tensor names, shapes and dtypes) before anything is written; the folder is written beside OUT_FOLDER and
renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from checkpoints_convert import shapes_of
from checkpoints_convert.mapping import Check, ConversionError, Plan, Rule, convert, plan, run_check, unflatten
from checkpoints_convert.source import SafetensorsSource
from jaxedit import clip_folder
from jaxedit.clip_folder import DESCRIPTION, PARAMS, TOKENIZER, TOKENIZER_FILES, ImageProcessing
from jaxedit.models import clip_vision
from jaxedit.models.clip_vision import CLIPModelConfig
from jaxedit.names.clip_model import POSITION_IDS, clip_model_rules

MANIFEST = "hf-clip-vit-large-patch14"


def manifest_shapes(name: str = MANIFEST) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the published CLIPModel (package data `manifests/NAME.json`)."""
    text = resources.files(__package__).joinpath("manifests", f"{name}.json").read_text()
    return {k: tuple(v) for k, v in json.loads(text)["tensors"].items()}


def _arange(shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.arange(shape[-1]), shape)


def rules(cfg: CLIPModelConfig, keys: Iterable[str]) -> list[Rule | Check]:
    """The library's table, plus a check of each `position_ids` buffer the file holds."""
    keys = set(keys)
    why = "position ids buffer: arange(num_positions)"
    return [*clip_model_rules(cfg), *(Check(k, value=_arange, why=why) for k in POSITION_IDS if k in keys)]


def plan_clip_model(shapes: dict[str, tuple[int, ...]], cfg: CLIPModelConfig, name: str = "checkpoint") -> Plan:
    """Check a CLIPModel's {tensor: shape} against `cfg` (ConversionError naming any unknown, missing or
    mis-shaped tensor)."""
    targets = shapes_of(clip_vision.abstract_params(cfg))
    return plan(rules(cfg, shapes), shapes, targets, source_name=name)


def read_config(src: Path) -> tuple[CLIPModelConfig, ImageProcessing]:
    """The model config (config.json) and image preprocessing (preprocessor_config.json) of a transformers
    CLIPModel folder; FileNotFoundError / ConversionError naming the file."""
    out = []
    for name, parse in (("config.json", CLIPModelConfig.from_hf), ("preprocessor_config.json", None)):
        path = src / name
        if not path.is_file():
            raise FileNotFoundError(f"{src}: no {name} (not a transformers CLIPModel folder)")
        try:
            d = json.loads(path.read_text())
            out.append(parse(d) if parse else ImageProcessing.from_hf(d, str(path)))
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
            raise ConversionError(f"{path}: {e}") from None
    return out[0], out[1]


def tokenizer_files(src: Path) -> list[Path]:
    files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
    names = {f.name for f in files}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise FileNotFoundError(f"{src}: no CLIP tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    return files


def convert_clip_model(src: str | Path, dst: str | Path, *, dtype: Any = None, force: bool = False, log=print) -> Path:
    """Convert the transformers CLIPModel folder `src` into the converted CLIP model folder `dst`."""
    from jaxedit.checkpoint import prepare_destination, recover_dir, save_params, seal
    from jaxedit.staged import staged_dir, write_file

    src, dst = Path(src), Path(dst).absolute()
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    recover_dir(dst, complete=DESCRIPTION)
    prepare_destination(dst, force=force, replaceable=lambda p: (p / DESCRIPTION).is_file(),
                        what="converted CLIP model folder")  # fmt: skip
    cfg, proc = read_config(src)
    tokenizer = tokenizer_files(src)
    source = SafetensorsSource(src)
    the_plan = plan_clip_model(source.shapes, cfg, source.describe())
    for key in {r.src for r in the_plan.rules}:
        source.dtype(key)
    for c in the_plan.checks:
        try:
            run_check(c, the_plan.check_shapes[c.src], source.read)
        except ConversionError as e:
            raise ConversionError(f"{source.describe()}: {e}") from None
    the_plan.checked = True
    with staged_dir(dst) as new:
        flat = convert(the_plan, source.read, dtype=dtype, source_dtype=source.dtype)
        save_params(new / PARAMS, unflatten(flat))
        (new / TOKENIZER).mkdir()
        for f in tokenizer:
            shutil.copy2(f, new / TOKENIZER / f.name)
        seal(new / TOKENIZER)
        write_file(new / DESCRIPTION, json.dumps(clip_folder.description(cfg, proc, str(src.absolute())), indent=1))
    n = sum(int(np.prod(s)) for s in the_plan.target_shapes.values())
    log(f"wrote CLIP model folder {dst} ({n / 1e6:.1f}M parameters, {len(tokenizer)} tokenizer files)")
    return dst
