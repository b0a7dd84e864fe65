"""Import PyTorch safetensors checkpoints (BFL, diffusers, Step1X-Edit layouts) into jaxedit.

Each `load_<part>(path, cfg, fmt=None, ...)` returns the parameter pytree the matching
jaxedit module's `init` gives (unboxed); the CLI (`python -m checkpoints_convert PART ...`)
writes it as an Orbax checkpoint. No torch, no pickle: tensors are read with safetensors
into numpy, one (part of a) tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints_convert import flux as flux_tables
from checkpoints_convert.mapping import ConversionError, Rule, convert, flatten, plan, unflatten
from checkpoints_convert.source import SafetensorsSource
from jaxedit.configs import FluxConfig

__all__ = ["LOADERS", "ConversionError", "convert_source", "load_transformer", "shapes_of", "transformer_plan"]

Place = Callable[[str, np.ndarray], Any]
Ignore = Callable[[str], bool]


def shapes_of(tree) -> dict[str, tuple[int, ...]]:
    """{"a/b": shape} of a (possibly abstract) parameter pytree."""
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def convert_source(
    source: SafetensorsSource,
    rules: Iterable[Rule],
    target_shapes: dict[str, tuple[int, ...]],
    *,
    dtype: Any = None,
    place: Place | None = None,
    ignore: Ignore | None = None,
) -> dict:
    """Plan (strict, shapes only) then stream `source` into a nested parameter dict."""
    the_plan = plan(rules, source.shapes, target_shapes, source_name=source.describe(), ignore=ignore)
    place = place or (lambda _, a: jax.device_put(a))
    return unflatten(convert(the_plan, source.read, dtype=dtype, source_dtype=source.dtype, place=place))


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
    targets = shapes_of(abstract_params(cfg))
    return plan(rules, source_shapes, targets, source_name=source_name, ignore=ignore), fmt, prefix


def load_transformer(
    path: str | Path,
    cfg: FluxConfig,
    fmt: str | None = None,
    *,
    dtype: Any = None,
    place: Place | None = None,
    ignore: Ignore | None = None,
) -> dict:
    """Read a FLUX transformer checkpoint into the `Flux(cfg)` parameter pytree.

    path: a .safetensors file, a sharded folder (with its index), or a diffusers
    `transformer/` folder. fmt: 'bfl' or 'diffusers' (detected from the keys if None).
    dtype: output dtype (default: keep the file's, so bfloat16 stays bfloat16).
    place(path, host_array): where each finished parameter goes (default: jax.device_put).
    ignore(key): True for source tensors to skip on purpose (anything else unknown raises).
    """
    from jaxedit.models.flux import abstract_params

    source = SafetensorsSource(path)
    prefix = flux_tables.strip_bfl_prefix(source.shapes)
    if prefix:
        source.strip(prefix)
    rules = flux_tables.rules_for(fmt or flux_tables.detect_format(source.shapes), cfg)
    return convert_source(source, rules, shapes_of(abstract_params(cfg)), dtype=dtype, place=place, ignore=ignore)


# CLI parts: name -> (Preset attribute holding the config, loader, formats the loader takes)
LOADERS: dict[str, tuple[str, Callable[..., dict], tuple[str, ...]]] = {
    "transformer": ("transformer", load_transformer, ("bfl", "diffusers")),
}
