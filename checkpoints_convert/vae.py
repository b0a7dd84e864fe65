"""The FLUX VAE's files: which layout (BFL `ae.safetensors`, Step1X-Edit `vae.safetensors`, or diffusers
`AutoencoderKL`) they are in; the key tables are the library's (`jaxedit.names.vae`).
"""

from __future__ import annotations

from jaxedit.configs import AutoEncoderConfig
from jaxedit.names import Rule
from jaxedit.names.vae import LAYOUTS

__all__ = ["FORMATS", "detect_format", "rules_for"]

FORMATS = tuple(LAYOUTS)


def detect_format(keys) -> str:
    """'bfl' or 'diffusers', from the tensor names."""
    keys = set(keys)
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in keys):
        return "bfl"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys):
        return "diffusers"
    raise ValueError(
        "cannot tell the VAE checkpoint layout from its keys "
        "(neither BFL `encoder.down.*` nor diffusers `encoder.down_blocks.*`)"
    )


def rules_for(fmt: str, cfg: AutoEncoderConfig) -> list[Rule]:
    """The key table of layout `fmt` ('bfl' or 'diffusers') for `AutoEncoder(cfg)`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown VAE checkpoint format {fmt!r}; choose from {list(FORMATS)}")
    return LAYOUTS[fmt](cfg)
