"""Community LoRAs for FLUX and Qwen-Image models: read any layout diffusers' `load_lora_weights` reads for the
model, apply them merged into the weights or at run time.

    lora = read_lora("style.safetensors", preset)  # LoraError names the file and the key of any problem
    merged = merge(params["transformer"], [lora.updates["transformer"]], [0.8])

What differs between model families is the family's (`jaxedit.families.Family`): the parts a LoRA may change
(`lora_parts`), how its files spell their keys (`lora_keys`) and the name table of each part and naming
(`lora_table`). `formats` reads a file's keys into terms (module name, factors, alpha / r), `targets` maps them
onto our parameters as `Update`s (where the part's name table, `jaxedit.names`, puts each module's weight),
`apply.merge` adds several LoRAs with their own scales. The pipeline
(`jaxedit.kontext.pipeline.KontextPipeline.add_lora`) merges at load, or keeps the factors and merges
inside its jitted program with the scales as traced arguments (a new scale does not recompile).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

from flax import traverse_util

from jaxedit import configs, families
from jaxedit.lora import targets
from jaxedit.lora.apply import Update, merge, merge_now
from jaxedit.lora.formats import LoraError, read_terms

__all__ = [
    "PARTS",
    "Lora",
    "LoraError",
    "Update",
    "check_scale",
    "merge",
    "merge_now",
    "parse_lora_arg",
    "part_shapes",
    "lora_args",
    "read_lora",
]

PARTS = ("transformer", "clip", "t5")  # the parts LoRA files name (`formats.KeyLayout`), in this order


@dataclasses.dataclass(frozen=True)
class Lora:
    """A LoRA file read for one model: its updates of each part it changes (numpy float32 factors)."""

    path: Path
    formats: tuple[str, ...]  # the layout(s) of its keys: "diffusers", "kohya", "bfl", "xlabs", "comfyui", "bare"
    sha256: str
    updates: dict[str, tuple[Update, ...]]  # part -> updates

    def describe(self) -> str:
        counts = ", ".join(f"{part}: {len({x.param for x in u})} kernels" for part, u in self.updates.items())
        return f"{self.path.name} ({'+'.join(self.formats)}; {counts})"


@functools.lru_cache(maxsize=8)
def part_shapes(preset: configs.Preset) -> dict[str, dict[str, tuple[int, ...]]]:
    """{part: {kernel path: shape}} of the parts a LoRA can change (the family's `lora_parts` the preset has)."""
    family = families.of(preset)
    out = {}
    for part in family.lora_parts:
        if getattr(preset, part) is not None:
            tree = traverse_util.flatten_dict(family.abstract_params(preset, part), sep="/")
            out[part] = {k: tuple(v.shape) for k, v in tree.items()}
    return out


def read_lora(path: str | Path, preset: configs.Preset) -> Lora:
    """A LoRA file (any layout of `jaxedit.lora.formats`) as updates of the preset's parts; LoraError naming the
    file and key if a key is of no known layout, a module is not in the model or a factor's shape does not fit."""
    family = families.of(preset)
    if not family.lora_parts:
        raise LoraError(f"{path}: LoRAs are not applied to {family.title} models ({preset.name})")
    shapes = part_shapes(preset)

    @functools.cache
    def kohya_names(part: str, naming: str) -> dict[str, str]:
        return targets.kohya_table(preset, part, naming) if part in shapes else {}

    read = read_terms(path, kohya_names, family.lora_keys())
    by_part = {}
    for part in dict.fromkeys((*PARTS, *(t.part for t in read.terms))):
        terms = [t for t in read.terms if t.part == part]
        if not terms:
            continue
        if part not in shapes:
            raise LoraError(f"{read.path}: key {terms[0].key}: the model has no {part}")
        by_part[part] = targets.updates(terms, preset, part, shapes[part], read.path)
    return Lora(read.path, read.formats, read.sha256, by_part)


def check_scale(scale, what: str = "LoRA scale") -> float:
    """A finite number (ValueError naming `what` otherwise)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"{what} must be a finite number, got {scale!r}")
    return float(scale)


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE or 1.0); a tail after the last ":" that is not a number is part of FILE."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return Path(text), 1.0
        return Path(head), check_scale(scale, f"--lora {text}: the scale")
    return Path(text), 1.0


def lora_args(specs: list[str], preset: configs.Preset) -> list:
    """(LoRA, scale) of each --lora FILE[:SCALE], read and checked against the model before it is loaded;
    ValueError (one line) naming the bad argument or file and key."""
    out = []
    for spec in specs:
        path, scale = parse_lora_arg(spec)
        try:
            out.append((read_lora(path, preset), scale))
        except ValueError as e:  # LoraError: names the file and the key
            raise ValueError(f"--lora: {e}") from None
    return out
