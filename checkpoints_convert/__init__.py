"""Import PyTorch safetensors checkpoints (BFL, diffusers, Step1X-Edit layouts) into jaxedit.

The parts families share (FLUX VAE, T5, CLIP, Qwen2.5-VL) are `SHARED_PARTS`; each family's own (its
transformer), its release layout and its published checkpoints are its converter's (`checkpoints_convert.family`:
`checkpoints_convert.kontext`, `checkpoints_convert.step1x`).

Each `load_<part>(path, cfg, fmt=None, ...)` returns the parameter pytree the matching
jaxedit module's `init` gives (unboxed); the CLI (`python -m checkpoints_convert PART ...`)
writes it as an Orbax checkpoint. No torch, no pickle: tensors are read with safetensors
into numpy, one (part of a) tensor at a time. `plan_part` runs every check on names and
shapes alone (a file's header, or a manifest through `ShapeSource`), before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints_convert import family
from checkpoints_convert import qwen as qwen_tables
from checkpoints_convert import text as text_tables
from checkpoints_convert import vae as vae_tables
from checkpoints_convert.family import Part
from checkpoints_convert.mapping import ConversionError, Plan, convert, flatten, plan, run_check, unflatten
from checkpoints_convert.source import SafetensorsSource
from jaxedit.configs import AutoEncoderConfig, CLIPTextConfig, QwenVLConfig, T5Config

__all__ = [
    "SHARED_PARTS",
    "ConversionError",
    "ShapeSource",
    "detect_part",
    "formats",
    "load_clip",
    "load_part",
    "load_t5",
    "load_transformer",
    "load_vae",
    "open_part",
    "part_config",
    "part_names",
    "part_spec",
    "plan_part",
    "shapes_of",
]

Place = Callable[[str, np.ndarray], Any]
Ignore = Callable[[str], bool]


def shapes_of(tree) -> dict[str, tuple[int, ...]]:
    """{"a/b": shape} of a (possibly abstract) parameter pytree."""
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


class ShapeSource:
    """A checkpoint known only by tensor names and shapes (e.g. a manifest): plans, never reads."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], name: str = "checkpoint"):
        self._shapes = {k: tuple(v) for k, v in shapes.items()}
        self.name = name

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def strip(self, prefix: str) -> None:
        self._shapes = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in self._shapes.items()}

    def describe(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------------
# Per part: (rules for a source, which may drop a wrapper prefix from its keys) and targets


def _vae_rules(source, cfg, fmt):
    fmt = fmt or vae_tables.detect_format(source.shapes)
    return vae_tables.rules_for(fmt, cfg), fmt


def _t5_rules(source, cfg, fmt):
    return text_tables.t5_rules(cfg, source.shapes, fmt), "transformers"


def _clip_rules(source, cfg, fmt):
    prefix = text_tables.clip_prefix(source.shapes)
    if prefix:
        source.strip(prefix)
    return text_tables.clip_rules(cfg, source.shapes, fmt), "transformers"


def _qwen_rules(source, cfg, fmt):
    return qwen_tables.qwen_rules(cfg, source.shapes, fmt), "transformers"


def targets_of(module: str):
    """cfg -> {param path: shape} of `jaxedit.models.<module>.abstract_params(cfg)`."""

    def targets(cfg):
        import importlib

        return shapes_of(importlib.import_module(f"jaxedit.models.{module}").abstract_params(cfg))

    return targets


# the parts families share, by part name (the name is also the Preset attribute holding the part's config);
# each family's own (its transformer) are its converter's (`checkpoints_convert.family`)
SHARED_PARTS: dict[str, Part] = {
    "vae": Part(AutoEncoderConfig, _vae_rules, targets_of("autoencoder"), vae_tables.FORMATS),
    "t5": Part(T5Config, _t5_rules, targets_of("t5"), text_tables.FORMATS),
    "clip": Part(CLIPTextConfig, _clip_rules, targets_of("clip"), text_tables.FORMATS),
    "qwen": Part(QwenVLConfig, _qwen_rules, targets_of("qwen2_5_vl"), qwen_tables.FORMATS),
}


def part_specs(part: str) -> list[Part]:
    """Every spec of a part name: the shared one and each family's."""
    shared = [SHARED_PARTS[part]] if part in SHARED_PARTS else []
    return shared + [c.parts[part] for c in family.all_converters() if part in c.parts]


def part_names() -> tuple[str, ...]:
    """Every model part name a checkpoint may hold (the families' own first)."""
    own = [p for c in family.all_converters() for p in c.parts]
    return tuple(dict.fromkeys([*own, *SHARED_PARTS]))


def formats(part: str) -> tuple[str, ...]:
    """The source layouts of a part name, over its specs."""
    return tuple(dict.fromkeys(f for spec in part_specs(part) for f in spec.formats))


def part_spec(part: str, cfg) -> Part:
    """The spec converting `part` into `cfg`'s parameters (by the config's type)."""
    if part not in part_names():
        raise ValueError(f"unknown model part {part!r}; choose from {sorted(part_names())}")
    found = [spec for spec in part_specs(part) if isinstance(cfg, spec.config)]
    if len(found) != 1:
        raise ValueError(f"no {part} converter takes a {type(cfg).__name__} config")
    return found[0]


def detect_part(keys) -> str:
    """Which model part a checkpoint holds, from its tensor names (ConversionError if none fits)."""
    keys = set(keys)
    if any(("double_blocks." in k or k.startswith("transformer_blocks.")) for k in keys):
        return "transformer"
    if any(k.endswith("encoder.conv_in.weight") or k.endswith("decoder.conv_out.weight") for k in keys):
        return "vae"
    if "shared.weight" in keys or any(k.startswith("encoder.block.") for k in keys):
        return "t5"
    if any(k.startswith("text_model.") or k.startswith("embeddings.token_embedding.") for k in keys):
        return "clip"
    if any(k.startswith(("model.visual.", "visual.", "model.language_model.")) for k in keys):
        return "qwen"
    raise ConversionError(f"cannot tell which model part the {len(keys)} tensors are (pass --part)")


def part_config(preset, part: str):
    """The config `load_part(part, ...)` takes for a preset: the preset's attribute of that name, or what
    its family's converter makes of it (Step1X-Edit: one file holds the DiT and the connector)."""
    return family.of(preset).part_config(preset, part)


def plan_part(part: str, source, cfg, fmt: str | None = None, *, ignore: Ignore | None = None) -> Plan:
    """Check a source (SafetensorsSource or ShapeSource) against `cfg` on shapes alone.

    Raises ConversionError naming any unknown, missing or mis-shaped tensor. The returned
    plan's `fmt` is the layout used (detected from the keys when `fmt` is None)."""
    spec = part_spec(part, cfg)
    rules, fmt = spec.rules(source, cfg, fmt)
    the_plan = plan(rules, source.shapes, spec.targets(cfg), source_name=source.describe(), ignore=ignore)
    the_plan.fmt = fmt
    return the_plan


def open_part(part: str, path: str | Path, cfg, fmt: str | None = None, *, ignore: Ignore | None = None):
    """(source, plan) for a checkpoint on disk, checked as far as it can be before converting anything:
    names and shapes (headers), every tensor's dtype, and the plan's checks (tied weights saved twice, fixed
    buffers such as CLIP's position ids: the only tensors read here)."""
    source = SafetensorsSource(path)
    the_plan = plan_part(part, source, cfg, fmt, ignore=ignore)
    for key in {r.src for r in the_plan.rules} | {c.src for c in the_plan.checks}:
        source.dtype(key)  # ConversionError naming the file for an unsupported dtype
    for c in the_plan.checks:
        run_check(c, the_plan.check_shapes[c.src], source.read)
    the_plan.checked = True
    return source, the_plan


def load_part(
    part: str,
    path: str | Path,
    cfg,
    fmt: str | None = None,
    *,
    dtype: Any = None,
    place: Place | None = None,
    ignore: Ignore | None = None,
) -> dict:
    """Read one model part's checkpoint into its jaxedit parameter pytree.

    dtype: output dtype (default: keep the file's, so bfloat16 stays bfloat16).
    place(path, host_array): where each finished parameter goes (default: jax.device_put),
    e.g. a device_put onto a sharding, so the full set is never gathered on one device.
    ignore(key): True for source tensors to skip on purpose (anything else unknown raises).
    """
    source, the_plan = open_part(part, path, cfg, fmt, ignore=ignore)
    place = place or (lambda _, a: jax.device_put(a))
    return unflatten(convert(the_plan, source.read, dtype=dtype, source_dtype=source.dtype, place=place))


def load_transformer(path, cfg, fmt=None, **kw) -> dict:
    """A family's transformer (cfg: `part_config(preset, "transformer")`): FLUX, a BFL file (also with
    `model.diffusion_model.`), a sharded folder with its index, or a diffusers `transformer/` folder -> `Flux(cfg)`
    params; Step1X-Edit's file -> `Step1XEdit` params (cfg a `Step1XSpec`). See `load_part`."""
    return load_part("transformer", path, cfg, fmt, **kw)


def load_vae(path, cfg, fmt=None, **kw) -> dict:
    """FLUX VAE: BFL `ae.safetensors` / Step1X-Edit `vae.safetensors` ('bfl') or a diffusers
    AutoencoderKL folder ('diffusers') -> `AutoEncoder(cfg)` params. See `load_part`."""
    return load_part("vae", path, cfg, fmt, **kw)


def load_t5(path, cfg, fmt=None, **kw) -> dict:
    """transformers T5EncoderModel (FLUX `text_encoder_2/`, one file or shards) -> `T5Encoder(cfg)`
    params; a file holding both tied embeddings must hold them equal. See `load_part`."""
    return load_part("t5", path, cfg, fmt, **kw)


def load_clip(path, cfg, fmt=None, **kw) -> dict:
    """transformers CLIPTextModel (FLUX `text_encoder/`, keys with or without `text_model.`; a saved
    `position_ids` buffer is checked, not loaded) -> `CLIPTextModel(cfg)` params. See `load_part`."""
    return load_part("clip", path, cfg, fmt, **kw)


def mesh_placer(shardings_tree) -> Place:
    """A `place` for `load_part` that puts each parameter straight onto its sharding as it
    streams (shardings_tree: e.g. `jaxedit.parallel.sharding.shardings(boxed_abstract, mesh)`), so
    no device ever holds the whole parameter set."""
    flat = flatten(shardings_tree)
    return lambda path, a: jax.device_put(a, flat[path])
