"""Name tables: which torch tensor fills which of our parameters, as data, one table per model.

A table is a list of `Rule`s, each copying one torch tensor (or a rectangular part of it) into one of our
parameters (or a rectangular part of it, at one layer of a stacked parameter), through a named transform:

    "copy"            as it is
    "linear"          torch Linear weight [out, in] -> Dense kernel [in, *out] (transposed)
    "conv"            torch Conv2d weight [O, I, kh, kw] -> [kh, kw, I, O]
    "conv1x1_linear"  a 1x1 Conv2d weight [O, I, 1, 1] -> Dense kernel [I, O]
    "patch_linear"    a conv with stride = kernel, on flattened patches -> [I * prod(kernel), O]

The tables live beside each other here (`flux`: BFL and diffusers layouts of the FLUX transformer; `text`:
transformers' CLIP and T5 encoders; `step1x`: Step1X-Edit's file, the BFL DiT plus its Qwen2 connector); the
converter (`checkpoints_convert`: strict plans over file sources, transforms, streaming) reads them. No jax or
numpy here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

Index = tuple[Any, ...]  # ints and slices


@dataclasses.dataclass(frozen=True)
class Rule:
    """target[dst][layer][dst_index] = TRANSFORMS[transform](source[src][src_index])."""

    src: str
    dst: str  # "/"-separated parameter path, e.g. "double_blocks/img_attn/qkv/kernel"
    transform: str = "copy"
    layer: int | None = None
    src_index: Index = ()
    dst_index: Index = ()


def linear(src: str, dst: str, *, layer=None, rows=None, cols=None, out_index: Index = (), bias=True) -> list[Rule]:
    """Rules for a torch Linear `src.{weight,bias}` -> Flax Dense `dst/{kernel,bias}`.

    rows/cols: slices of the torch weight's out/in axes (a part of a fused weight);
    out_index: where the part lands in the kernel's output axes (and the bias).
    """
    rows = slice(None) if rows is None else rows
    cols = slice(None) if cols is None else cols
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", "linear", layer, (rows, cols), (slice(None), *out_index))]
    if bias:
        rules.append(Rule(f"{src}.bias", f"{dst}/bias", "copy", layer, (rows,), tuple(out_index)))
    return rules


def copy(src: str, dst: str, *, layer=None) -> list[Rule]:
    return [Rule(src, dst, "copy", layer)]
