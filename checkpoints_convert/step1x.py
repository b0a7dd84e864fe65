"""Step1X-Edit's transformer file (`step1x-edit-i1258.safetensors`): the BFL DiT plus the Qwen2 connector
under `connector.`, read with the library's key table (`jaxedit.names.step1x`).
"""

from __future__ import annotations

from typing import NamedTuple

from jaxedit.configs import ConnectorConfig, FluxConfig, Preset
from jaxedit.names import Rule
from jaxedit.names import step1x as names
from jaxedit.names.step1x import connector_rules

__all__ = ["FORMAT", "Step1XSpec", "connector_rules", "is_step1x", "step1x_rules"]

FORMAT = "step1x"


class Step1XSpec(NamedTuple):
    """What the transformer converter needs for a Step1X-Edit file: the DiT and connector configs."""

    dit: FluxConfig
    connector: ConnectorConfig

    @classmethod
    def of(cls, preset: Preset) -> Step1XSpec:
        if preset.connector is None:
            raise ValueError(f"preset {preset.name} has no connector (not a Step1X-Edit preset)")
        return cls(preset.transformer, preset.connector)


def is_step1x(keys) -> bool:
    """True for a Step1X-Edit transformer file (it carries the connector's tensors)."""
    return any(k.startswith("connector.") for k in keys)


def step1x_rules(spec: Step1XSpec) -> list[Rule]:
    """The whole Step1X-Edit file: BFL DiT names + `connector.*` (the library's table)."""
    if spec.dit.guidance_embed:
        raise ValueError("Step1X-Edit has no guidance_in: its DiT config needs guidance_embed=False")
    return names.step1x_rules(spec.dit, spec.connector)
