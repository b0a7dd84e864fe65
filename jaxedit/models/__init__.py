"""Flax Linen models of jaxedit: the ones several families share here (which family uses which: `jaxedit.families`)."""

from __future__ import annotations

from jaxedit.models.autoencoder import AutoEncoder
from jaxedit.models.clip import CLIPTextModel
from jaxedit.models.flux import Flux
from jaxedit.models.t5 import T5Encoder

__all__ = ["AutoEncoder", "CLIPTextModel", "Flux", "T5Encoder"]
