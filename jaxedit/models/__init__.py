"""Flax Linen models of jaxedit."""

from jaxedit.models.flux import Flux

__all__ = ["Flux"]
