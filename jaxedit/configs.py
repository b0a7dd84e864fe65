"""Model presets: frozen dataclasses, looked up by name with `get(name)`.

A preset names one model family and holds the architecture of each of its parts.
Every architecture number of the full-size models lives here; modules read them
from their config and hard-code none. Runtime choices (dtypes, scan, remat,
attention kernel) are module arguments, not part of a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class FluxConfig:
    """The MMDiT of FLUX.1 (BFL `FluxParams`): double-stream then single-stream blocks."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # pooled text vector (CLIP-L)
    context_in_dim: int = 4096  # text tokens (T5-XXL)
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per id axis; sums to head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # guidance-distilled models (FLUX.1 [dev], Kontext)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"FluxConfig: sum(axes_dim) {sum(self.axes_dim)} != head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"FluxConfig: every axes_dim entry must be even, got {self.axes_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class Preset:
    """A named model: its family and the config of each part (None where not built yet)."""

    name: str
    family: str  # "flux" (text-to-image), "flux-kontext" (editing), "step1x-edit"
    transformer: FluxConfig


FLUX_DEV = FluxConfig()

_PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    _PRESETS[preset.name] = preset
    return preset


register(Preset("flux-kontext-dev", "flux-kontext", FLUX_DEV))
register(Preset("flux-dev", "flux", FLUX_DEV))
# Small presets for tests, demos and benchmarks: full structure, tiny widths.
_TINY = FluxConfig(
    context_in_dim=32,
    vec_in_dim=24,
    hidden_size=48,
    num_heads=3,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(4, 6, 6),
)
register(Preset("flux-kontext-tiny", "flux-kontext", _TINY))
register(
    Preset("flux-kontext-tiny-fulldepth", "flux-kontext", dataclasses.replace(_TINY, depth=19, depth_single_blocks=38))
)


def get(name: str) -> Preset:
    """Return the preset called `name`; the error lists the known names."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}") from None


def names() -> list[str]:
    return sorted(_PRESETS)
