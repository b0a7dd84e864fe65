"""The FLUX transformer's files: which layout (BFL or diffusers) they are in, and its wrapper prefixes.

The key tables themselves are the library's (`jaxedit.names.flux`: `bfl_rules`, `diffusers_rules`), which
the LoRA loader and exporter derive from as well.
"""

from __future__ import annotations

from collections.abc import Mapping

from jaxedit.configs import FluxConfig
from jaxedit.names import Rule
from jaxedit.names.flux import LAYOUTS, bfl_rules, diffusers_rules

__all__ = ["BFL_PREFIXES", "bfl_rules", "detect_format", "diffusers_rules", "rules_for", "strip_bfl_prefix"]

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def detect_format(keys) -> str:
    """'bfl' or 'diffusers', from the tensor names (BFL prefixes already stripped)."""
    keys = set(keys)
    if any(k.startswith("double_blocks.") for k in keys) or "img_in.weight" in keys:
        return "bfl"
    if any(k.startswith("transformer_blocks.") for k in keys) or "x_embedder.weight" in keys:
        return "diffusers"
    raise ValueError(
        "cannot tell the checkpoint layout from its keys "
        "(neither BFL `double_blocks.*` nor diffusers `transformer_blocks.*`)"
    )


def rules_for(fmt: str, cfg: FluxConfig) -> list[Rule]:
    if fmt not in LAYOUTS:
        raise ValueError(f"unknown transformer checkpoint format {fmt!r}; choose from {sorted(LAYOUTS)}")
    return LAYOUTS[fmt](cfg)


def strip_bfl_prefix(keys: Mapping) -> str | None:
    """The BFL wrapper prefix every key carries (ComfyUI-style files), if any."""
    for p in BFL_PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return None
