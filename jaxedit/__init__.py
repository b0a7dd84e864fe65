"""jaxedit: instruction-based image editing models (FLUX.1 Kontext, Step1X-Edit) in JAX/Flax."""

__version__ = "0.1.0"
