"""Flax Linen models of jaxedit."""

from __future__ import annotations

from typing import Any

from jaxedit import configs
from jaxedit.models import flux, step1x
from jaxedit.models.autoencoder import AutoEncoder
from jaxedit.models.clip import CLIPTextModel
from jaxedit.models.flux import Flux
from jaxedit.models.step1x import Step1XEdit
from jaxedit.models.t5 import T5Encoder

__all__ = ["AutoEncoder", "CLIPTextModel", "Flux", "Step1XEdit", "T5Encoder", "transformer"]


def transformer(preset: configs.Preset, **kw: Any):
    """(the preset's transformer module, example inputs for its `init`): `Flux`, or `Step1XEdit` for a preset
    with a connector. kw: module arguments (dtype, param_dtype, scan_layers, remat_policy, attention_impl)."""
    if preset.connector is None:
        return Flux(preset.transformer, **kw), flux.example_inputs(preset.transformer)
    module = Step1XEdit(preset.transformer, connector_cfg=preset.connector, **kw)
    return module, step1x.example_inputs(preset.transformer, preset.connector)
