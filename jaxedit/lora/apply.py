"""Low-rank updates in our parameter layout, and adding them to the weights.

An `Update` adds scale * a @ b to a box of one kernel: `param` is the kernel's "/"-path in a part's
parameter tree ([L, in, *out] stacked over layers, or [in, *out]), `box` the (start, stop) of each
output axis it covers, a [L, in, r] / [in, r] and b [L, r, *box] / [r, *box] (the file's alpha / r
folded into b). A LoRA is a tuple of updates per part (`jaxedit.lora.targets`); `merge` adds several
LoRAs, each with its own scale, in float32 and casts once to the kernel's dtype (a quantised kernel,
`jaxedit.quant`, is dequantised, updated and quantised again with new scales). Updates are pytrees
whose path and box are static, so `jax.jit(merge)` takes the factors and the scales as traced
arguments: a new scale reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxedit import quant


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Update:
    """kernel[..., box] += scale * a @ b (see the module docstring for the shapes)."""

    param: str = dataclasses.field(metadata={"static": True})
    box: tuple[tuple[int, int], ...] = dataclasses.field(metadata={"static": True})
    a: Any = None
    b: Any = None

    @property
    def stacked(self) -> bool:
        return np.ndim(self.a) == 3


def delta(a, b, stacked: bool) -> jax.Array:
    """a @ b in float32, a [L, in, r] / [in, r], b [L, r, *box] / [r, *box] -> [L, in, *box] / [in, *box]."""
    b = jnp.asarray(b, jnp.float32)
    out = b.shape[1 + stacked :]
    b = b.reshape(*b.shape[: 1 + stacked], math.prod(out))
    d = jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32), b, precision=jax.lax.Precision.HIGHEST)
    return d.reshape(*d.shape[:-1], *out)


def merge(params: dict, loras: Sequence[Sequence[Update]], scales) -> dict:
    """params (a part's tree) with every kernel a LoRA updates replaced by W + sum_i scales[i] * a_i @ b_i
    (float32 sums, cast to W's dtype); untouched leaves are shared. scales: [len(loras)], may be traced.
    Updates of one box from several LoRAs are one product: [a_1 .. a_n] @ [s_1 b_1; ..; s_n b_n]."""
    boxes: dict[str, dict[tuple, list[tuple[int, Update]]]] = defaultdict(lambda: defaultdict(list))
    for i, updates in enumerate(loras):
        for u in updates:
            boxes[u.param][u.box].append((i, u))
    if not boxes:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    scales = jnp.asarray(scales, jnp.float32)
    for path, by_box in boxes.items():
        w, scale = flat[path], flat.get(quant.scale_path(path))
        acc = jnp.asarray(w, jnp.float32) if scale is None else quant.dequantize(w, scale)
        for box, items in by_box.items():
            stacked = items[0][1].stacked
            a = jnp.concatenate([jnp.asarray(u.a, jnp.float32) for _, u in items], axis=-1)
            b = jnp.concatenate([scales[i] * jnp.asarray(u.b, jnp.float32) for i, u in items], axis=int(stacked))
            index = (slice(None),) * (1 + stacked) + tuple(slice(lo, hi) for lo, hi in box)
            acc = acc.at[index].add(delta(a, b, stacked))
        if scale is None:
            flat[path] = acc.astype(w.dtype)
        else:  # a quantised kernel: W + update quantised again, with new scales
            flat[path], flat[quant.scale_path(path)] = quant.requantize(acc, w.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


_merge = jax.jit(merge)


def merge_now(params: dict, loras: Sequence[Sequence[Update]], scales) -> dict:
    """`merge` as one jitted program over the kernels the LoRAs change (the other leaves are shared, not copied):
    what merging at load runs. Peak memory: the changed kernels twice."""
    paths = {u.param for updates in loras for u in updates}
    if not paths:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    paths |= {quant.scale_path(p) for p in paths if quant.scale_path(p) in flat}  # quantised kernels' scales
    sub = traverse_util.unflatten_dict({p: flat[p] for p in paths}, sep="/")
    flat.update(traverse_util.flatten_dict(_merge(sub, loras, np.asarray(scales, np.float32)), sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")
