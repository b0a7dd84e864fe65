"""The FLUX.1 (Kontext) family's converter: its transformer (BFL or diffusers layout, `checkpoints_convert.flux`),
its published checkpoints, and its text encoders straight from a release folder (`flux_text_encoder`).

A release is a diffusers folder (model_index.json, transformer/, vae/, text_encoder/ (CLIP), text_encoder_2/
(T5), tokenizer/, tokenizer_2/) or a BFL-style folder (the DiT file and ae.safetensors at the top, the text
encoders' folders beside them); `checkpoints_convert.pipeline.locate` finds either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from checkpoints_convert import flux as flux_tables
from checkpoints_convert import load_clip, load_t5, targets_of
from checkpoints_convert.family import FamilyConverter, Part
from checkpoints_convert.published import Published
from jaxedit import presets
from jaxedit.configs import FluxConfig

DEV = ("flux-kontext-dev", "flux-dev")


def transformer_rules(source, cfg: FluxConfig, fmt: str | None):
    """(rules, layout) of a FLUX transformer checkpoint; a BFL wrapper prefix is dropped from its keys."""
    prefix = flux_tables.strip_bfl_prefix(source.shapes)
    if prefix:
        source.strip(prefix)
    fmt = fmt or flux_tables.detect_format(source.shapes)
    return flux_tables.rules_for(fmt, cfg), fmt


class KontextConverter(FamilyConverter):
    parts = {"transformer": Part(FluxConfig, transformer_rules, targets_of("flux"), ("bfl", "diffusers"))}
    published = (
        Published("bfl-flux1-kontext-dev", "transformer", "bfl", DEV),
        Published("diffusers-flux-transformer", "transformer", "diffusers", DEV),
        Published("bfl-ae", "vae", "bfl", DEV),
        Published("diffusers-flux-vae", "vae", "diffusers", DEV),
        Published("hf-t5-v1_1-xxl-encoder", "t5", "transformers", DEV),
        Published("hf-clip-vit-large-patch14-text", "clip", "transformers", DEV),
    )


CONVERTER = KontextConverter()


def flux_text_encoder(root: str | Path, preset: str = "flux-kontext-dev", *, dtype: Any = None, **kw):
    """A `jaxedit.kontext.text.FluxTextEncoder` straight from a local FLUX release folder: `tokenizer/`,
    `tokenizer_2/` and the safetensors of `text_encoder/` (CLIP) and `text_encoder_2/` (T5, maybe sharded).
    dtype: compute dtype and the weights' dtype (default bfloat16); kw: FluxTextEncoder arguments."""
    import jax.numpy as jnp

    from jaxedit.kontext.text import FluxTextEncoder, load_tokenizer

    p = presets.get(preset) if isinstance(preset, str) else preset
    if p.t5 is None or p.clip is None:
        raise ValueError(f"preset {p.name} has no T5/CLIP text encoders")
    root, dtype = Path(root), dtype or jnp.bfloat16
    t5 = load_t5(root / "text_encoder_2", p.t5, dtype=dtype)
    clip = load_clip(root / "text_encoder", p.clip, dtype=dtype)
    tokenizers = load_tokenizer(root / "tokenizer_2"), load_tokenizer(root / "tokenizer")
    return FluxTextEncoder(p.t5, p.clip, t5, clip, *tokenizers, dtype=dtype, **kw)
