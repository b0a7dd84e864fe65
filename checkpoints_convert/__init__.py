"""Import PyTorch safetensors checkpoints (BFL, diffusers, Step1X-Edit layouts) into jaxedit.

`load_transformer(path, cfg)` returns the parameter pytree `Flux(cfg).init` gives
(unboxed); the CLI (`python -m checkpoints_convert`) writes it as an Orbax checkpoint.
No torch, no pickle: tensors are read with safetensors into numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints_convert import flux as flux_tables
from checkpoints_convert.mapping import ConversionError, convert, flatten, plan, unflatten
from checkpoints_convert.source import SafetensorsSource
from jaxedit.configs import FluxConfig

__all__ = ["ConversionError", "load_transformer", "transformer_plan"]


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def transformer_plan(
    source_shapes: dict, cfg: FluxConfig, fmt: str | None = None, *, source_name="checkpoint", ignore=None
):
    """Check a transformer checkpoint (names -> shapes) against `cfg`; returns (plan, fmt, prefix)."""
    from jaxedit.models.flux import abstract_params

    prefix = flux_tables.strip_bfl_prefix(source_shapes)
    if prefix:
        source_shapes = {k[len(prefix) :]: v for k, v in source_shapes.items()}
    fmt = fmt or flux_tables.detect_format(source_shapes)
    rules = flux_tables.rules_for(fmt, cfg)
    targets = _shapes(abstract_params(cfg))
    return plan(rules, source_shapes, targets, source_name=source_name, ignore=ignore), fmt, prefix


def load_transformer(
    path: str | Path,
    cfg: FluxConfig,
    fmt: str | None = None,
    *,
    dtype: Any = None,
    place: Callable[[str, np.ndarray], Any] | None = None,
    ignore: Callable[[str], bool] | None = None,
) -> dict:
    """Read a FLUX transformer checkpoint into the `Flux(cfg)` parameter pytree.

    path: a .safetensors file, a sharded folder (with its index), or a diffusers
    `transformer/` folder. fmt: 'bfl' or 'diffusers' (detected from the keys if None).
    dtype: output dtype (default: keep the file's, so bfloat16 stays bfloat16).
    place(path, host_array): where each finished parameter goes (default: jax.device_put).
    ignore(key): True for source tensors to skip on purpose (anything else unknown raises).
    """
    source = SafetensorsSource(path)
    the_plan, fmt, prefix = transformer_plan(source.shapes, cfg, fmt, source_name=source.describe(), ignore=ignore)
    if prefix:
        source.strip(prefix)
    place = place or (lambda _, a: jax.device_put(a))
    flat = convert(the_plan, source.read, dtype=dtype, source_dtype=source.dtype, place=place)
    return unflatten(flat)
