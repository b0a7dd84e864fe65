"""Weight quantisation with qwix: int8 or fp8 (e4m3) kernels with one scale per output channel.

What is quantised (`RULES`): every linear kernel inside the stacked blocks, where nearly all the weights are. FLUX /
Step1X-Edit DiT: `double_blocks/` and `single_blocks/` (attention qkv and output projections, MLPs and the
modulation heads: 11.8B of FLUX.1's 11.9B parameters); Qwen-Image's `transformer_blocks/`. T5-XXL: `block/` (q, k,
v, o, wi_0, wi_1, wo: 4.6B of 4.8B). What stays in the compute dtype, and why: the input and output projections
(`img_in`, `txt_in`, the time / guidance / pooled-vector MLPs, `final_layer`: 0.1% of the weights, at the model's
two ends where an error reaches the velocity unaveraged), biases, norm scales, T5's token embedding (a table lookup,
not a matmul) and relative-position bias, the Step1X-Edit connector (small), CLIP-L and the VAE (small, and the VAE
runs in float32).

Stored: `kernel` in int8 / float8_e4m3fn with the float kernel's shape [L, in, *out], beside it `kernel_scale`
float32 [L, 1, *out] (absmax over the input axis / qwix's bound for the type: 127.5 for int8, its top bucket used
in full, 448 for e4m3), so kernel ~ q * scale. The layers (`jaxedit.models.layers.MultiOutDense`) see a
quantised kernel by its one-byte dtype and run `qwix.dot_general` on a `qwix.QArray` (weight-only: the weights
are dequantised to the compute dtype inside the matmul's program; the activations stay bfloat16).
Quantisation happens on the host (each tensor as it is converted or loaded), so a bfloat16 copy of the whole
model never sits on the accelerator.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

MODES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
RULES = {
    "transformer": re.compile(r"^(double_blocks|single_blocks|transformer_blocks)/.*/kernel$"),
    "t5": re.compile(r"^block/.*/kernel$"),
}
IN_AXIS = 1  # every quantised kernel is stacked over layers: [L, in, *out]
SCALE = "kernel_scale"


def check_mode(mode: str | None) -> str | None:
    """The mode, None for none/"none"/"", or ValueError listing the choices."""
    if mode in (None, "", "none"):
        return None
    if mode not in MODES:
        raise ValueError(f"quantize: {mode!r} is not one of none, {', '.join(MODES)}")
    return mode


def quantized(part: str, path: str) -> bool:
    """Whether `path` ("/"-joined) of `part`'s parameters is a kernel the rules quantise."""
    rule = RULES.get(part)
    return rule is not None and rule.match(path) is not None


def scale_path(kernel_path: str) -> str:
    return kernel_path[: -len("kernel")] + SCALE


def _quantize(w: jax.Array, qtype) -> tuple[jax.Array, jax.Array]:
    import qwix

    axes = tuple(a for a in range(w.ndim) if a != IN_AXIS)
    qa = qwix.quantize(w.astype(jnp.float32), qtype, channelwise_axes=axes)
    return qa.qvalue, qa.scale


_quantize_jit = jax.jit(_quantize, static_argnums=1)


def quantize_array(w: Any, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(q [L, in, *out] int8 / e4m3, scale [L, 1, *out] float32) of a float kernel, computed by qwix on the
    host's CPU device (whatever the default device is), returned as numpy."""
    cpu = jax.devices("cpu")[0]
    q, s = _quantize_jit(jax.device_put(np.asarray(w), cpu), MODES[mode])
    return np.asarray(q), np.asarray(s, np.float32)


def quantize_flat(part: str, flat: dict[str, Any], mode: str | None) -> dict[str, Any]:
    """A part's flat {"/"-path: array} with each kernel the rules name replaced by its quantised values and
    scale (one tensor at a time; the float copy of each is dropped as it is replaced)."""
    if check_mode(mode) is None:
        return flat
    for path in [p for p in flat if quantized(part, p)]:
        if np.dtype(flat[path].dtype).itemsize == 1:
            raise ValueError(f"{part}/{path} is already quantised ({flat[path].dtype})")
        flat[path], flat[scale_path(path)] = quantize_array(flat.pop(path), mode)
    return flat


def quantize_params(part: str, params: dict, mode: str | None) -> dict:
    """`quantize_flat` on a nested parameter tree."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(quantize_flat(part, flat, mode), sep="/")


def quantize_abstract(part: str, tree: dict, mode: str | None) -> dict:
    """The parameter tree (ShapeDtypeStructs, boxed with logical axis names or not) of `part` quantised with
    `mode`: each quantised kernel takes the one-byte dtype, its scale [L, 1, *out] float32 the kernel's axis
    names with the input axis unnamed (so the sharding rules place it with its kernel's output channels)."""
    import flax.linen as nn

    if check_mode(mode) is None:
        return tree
    qtype = jnp.dtype(MODES[mode])
    flat = traverse_util.flatten_dict(tree, sep="/")
    for path in [p for p in flat if quantized(part, p)]:
        leaf = flat[path]
        boxed = isinstance(leaf, nn.meta.AxisMetadata)
        s = leaf.unbox() if boxed else leaf
        shape = tuple(1 if a == IN_AXIS else d for a, d in enumerate(s.shape))
        q, scale = jax.ShapeDtypeStruct(s.shape, qtype), jax.ShapeDtypeStruct(shape, jnp.float32)
        if boxed:
            names = tuple(None if a == IN_AXIS else n for a, n in enumerate(leaf.names))
            q, scale = leaf.replace_boxed(q), leaf.replace_boxed(scale).replace(names=names)
        flat[path], flat[scale_path(path)] = q, scale
    return traverse_util.unflatten_dict(flat, sep="/")


def mode_of(params: Any) -> str | None:
    """The mode a parameter tree is quantised with (None: not quantised)."""
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params) if jnp.dtype(x.dtype).itemsize == 1}
    for mode, qtype in MODES.items():
        if jnp.dtype(qtype) in dtypes:
            return mode
    return None


def keeps_dtype(path: str, dtype) -> bool:
    """Leaves a compute-dtype cast must leave alone: quantised kernels (one byte) and their scales."""
    return jnp.dtype(dtype).itemsize == 1 or path.endswith(SCALE)


def cast(tree: Any, dtype) -> Any:
    """Every leaf (arrays or ShapeDtypeStructs) cast to `dtype`, except quantised kernels and their scales."""

    def one(path, x):
        if keeps_dtype(jax.tree_util.keystr(path, simple=True, separator="/"), x.dtype):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return jnp.asarray(x, dtype)

    return jax.tree_util.tree_map_with_path(one, tree)


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """q * scale in float32 (the float kernel a quantised one stands for)."""
    return q.astype(jnp.float32) * scale


def requantize(w: jax.Array, qtype) -> tuple[jax.Array, jax.Array]:
    """A float kernel [L, in, *out] quantised again (in the program, e.g. after a LoRA is merged in)."""
    return _quantize(w, qtype)


def matmul(x: jax.Array, q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """x [..., in] @ a quantised kernel (q [in, *out], scale [1, *out]) -> [..., *out] in `dtype`, by
    `qwix.dot_general` on the `QArray` (weight-only: the kernel is dequantised to `dtype` in the program)."""
    import qwix

    w = qwix.QArray(q, scale.astype(dtype), qtype=q.dtype)
    return qwix.dot_general(x.astype(dtype), w, (((x.ndim - 1,), (0,)), ((), ())))
