"""Import PyTorch safetensors checkpoints (BFL, diffusers, Step1X-Edit layouts) into jaxedit.

Each `load_<part>(path, cfg, fmt=None, ...)` returns the parameter pytree the matching
jaxedit module's `init` gives (unboxed); the CLI (`python -m checkpoints_convert PART ...`)
writes it as an Orbax checkpoint. No torch, no pickle: tensors are read with safetensors
into numpy, one (part of a) tensor at a time. `plan_part` runs every check on names and
shapes alone (a file's header, or a manifest through `ShapeSource`), before any tensor is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints_convert import flux as flux_tables
from checkpoints_convert import qwen as qwen_tables
from checkpoints_convert import step1x as step1x_tables
from checkpoints_convert import text as text_tables
from checkpoints_convert import vae as vae_tables
from checkpoints_convert.mapping import ConversionError, Plan, convert, flatten, plan, run_check, unflatten
from checkpoints_convert.source import SafetensorsSource

__all__ = [
    "PARTS",
    "ConversionError",
    "ShapeSource",
    "detect_part",
    "flux_text_encoder",
    "load_clip",
    "load_part",
    "load_t5",
    "load_transformer",
    "load_vae",
    "open_part",
    "part_config",
    "plan_part",
    "qwen_embedder",
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


def _transformer_rules(source, cfg, fmt):
    prefix = flux_tables.strip_bfl_prefix(source.shapes)
    if prefix:
        source.strip(prefix)
    if isinstance(cfg, step1x_tables.Step1XSpec):  # Step1X-Edit: BFL DiT + connector in one file
        if fmt not in (None, step1x_tables.FORMAT):
            raise ConversionError(f"a Step1X-Edit transformer is read in layout {step1x_tables.FORMAT!r}, not {fmt!r}")
        return step1x_tables.step1x_rules(cfg), step1x_tables.FORMAT
    if fmt == step1x_tables.FORMAT:
        raise ConversionError("format 'step1x' needs a Step1X-Edit preset (one with a connector)")
    fmt = fmt or flux_tables.detect_format(source.shapes)
    return flux_tables.rules_for(fmt, cfg), fmt


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


def _targets(module: str):
    def targets(cfg):
        import importlib

        return shapes_of(importlib.import_module(f"jaxedit.models.{module}").abstract_params(cfg))

    return targets


def _transformer_targets(cfg):
    if isinstance(cfg, step1x_tables.Step1XSpec):
        from jaxedit.models import step1x

        return shapes_of(step1x.abstract_params(cfg.dit, cfg.connector))
    return _targets("flux")(cfg)


@dataclasses.dataclass(frozen=True)
class Part:
    rules: Callable  # (source, cfg, fmt) -> (rules, fmt); may strip a key prefix from the source
    targets: Callable  # cfg -> {param path: shape}
    formats: tuple[str, ...]


# name -> Part; the name is also the Preset attribute holding the part's config
PARTS: dict[str, Part] = {
    "transformer": Part(_transformer_rules, _transformer_targets, ("bfl", "diffusers", step1x_tables.FORMAT)),
    "vae": Part(_vae_rules, _targets("autoencoder"), vae_tables.FORMATS),
    "t5": Part(_t5_rules, _targets("t5"), text_tables.FORMATS),
    "clip": Part(_clip_rules, _targets("clip"), text_tables.FORMATS),
    "qwen": Part(_qwen_rules, _targets("qwen2_5_vl"), qwen_tables.FORMATS),
}


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
    """The config `load_part(part, ...)` takes for a preset: the preset's attribute of that name,
    except a Step1X-Edit transformer: `Step1XSpec(DiT config, connector config)` (one file holds both)."""
    cfg = getattr(preset, part)
    if part == "transformer" and cfg is not None and preset.connector is not None:
        return step1x_tables.Step1XSpec.of(preset)
    return cfg


def plan_part(part: str, source, cfg, fmt: str | None = None, *, ignore: Ignore | None = None) -> Plan:
    """Check a source (SafetensorsSource or ShapeSource) against `cfg` on shapes alone.

    Raises ConversionError naming any unknown, missing or mis-shaped tensor. The returned
    plan's `fmt` is the layout used (detected from the keys when `fmt` is None)."""
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}; choose from {sorted(PARTS)}")
    rules, fmt = PARTS[part].rules(source, cfg, fmt)
    the_plan = plan(rules, source.shapes, PARTS[part].targets(cfg), source_name=source.describe(), ignore=ignore)
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
    """FLUX transformer: a BFL file (also with `model.diffusion_model.`), a sharded folder with
    its index, or a diffusers `transformer/` folder -> `Flux(cfg)` params; with cfg a
    `Step1XSpec` (`part_config(preset, "transformer")`), Step1X-Edit's file -> `Step1XEdit`
    params. See `load_part`."""
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


def flux_text_encoder(root: str | Path, preset: str = "flux-kontext-dev", *, dtype: Any = None, **kw):
    """A `jaxedit.kontext.text.FluxTextEncoder` straight from a local FLUX release folder: `tokenizer/`,
    `tokenizer_2/` and the safetensors of `text_encoder/` (CLIP) and `text_encoder_2/` (T5, maybe sharded).
    dtype: compute dtype and the weights' dtype (default bfloat16); kw: FluxTextEncoder arguments."""
    import jax.numpy as jnp

    from jaxedit import configs
    from jaxedit.kontext.text import FluxTextEncoder, load_tokenizer

    p = configs.get(preset) if isinstance(preset, str) else preset
    if p.t5 is None or p.clip is None:
        raise ValueError(f"preset {p.name} has no T5/CLIP text encoders")
    root, dtype = Path(root), dtype or jnp.bfloat16
    t5 = load_t5(root / "text_encoder_2", p.t5, dtype=dtype)
    clip = load_clip(root / "text_encoder", p.clip, dtype=dtype)
    tokenizers = load_tokenizer(root / "tokenizer_2"), load_tokenizer(root / "tokenizer")
    return FluxTextEncoder(p.t5, p.clip, t5, clip, *tokenizers, dtype=dtype, **kw)


def qwen_embedder(path: str | Path, config=None, *, dtype: Any = "bfloat16", **kw):
    """A `jaxedit.step1x.text.Step1XQwenEmbedder` straight from a transformers Qwen2.5-VL folder (config.json,
    safetensors, tokenizer, preprocessor_config.json), its weights converted as they are read (no torch).
    config: the `QwenEmbedderConfig` (default: the released 7B setup); kw: Step1XQwenEmbedder arguments."""
    import json

    import jax.numpy as jnp

    from jaxedit.configs import QwenVLConfig
    from jaxedit.step1x.text import QwenEmbedderConfig, Step1XQwenEmbedder, check_hidden

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"Qwen2.5-VL folder not found: {path} (no config.json)")
    config = config or QwenEmbedderConfig()
    qwen_cfg = QwenVLConfig.from_hf(json.loads((path / "config.json").read_text()))
    check_hidden(qwen_cfg, config, path)
    params = load_part("qwen", path, qwen_cfg, dtype=jnp.dtype(dtype))
    processor = Step1XQwenEmbedder.load_processor(path, config)
    return Step1XQwenEmbedder(params, qwen_cfg, *processor, config, dtype=dtype, name=path.resolve(), **kw)


def mesh_placer(shardings_tree) -> Place:
    """A `place` for `load_part` that puts each parameter straight onto its sharding as it
    streams (shardings_tree: e.g. `jaxedit.parallel.sharding.shardings(boxed_abstract, mesh)`), so
    no device ever holds the whole parameter set."""
    flat = flatten(shardings_tree)
    return lambda path, a: jax.device_put(a, flat[path])
