"""jaxedit: instruction-based image editing models (FLUX.1 Kontext, Step1X-Edit) in JAX/Flax."""

from pathlib import Path

__version__ = "0.1.0"

# the small shipped model the `jaxedit edit` command uses when no --model is given (package data)
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"
