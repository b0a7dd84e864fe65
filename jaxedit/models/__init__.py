"""Flax Linen models of jaxedit (which family uses which: `jaxedit.families`)."""

from __future__ import annotations

from jaxedit.models.autoencoder import AutoEncoder
from jaxedit.models.clip import CLIPTextModel
from jaxedit.models.flux import Flux
from jaxedit.models.step1x import Step1XEdit
from jaxedit.models.t5 import T5Encoder

__all__ = ["AutoEncoder", "CLIPTextModel", "Flux", "Step1XEdit", "T5Encoder"]
