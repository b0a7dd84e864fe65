"""LoRA adapters on the projections of the DiT blocks: init, merge, export for diffusers/PEFT.

An adapter on a target is a pair a [layers, in, r], b [layers, r, out] stacked on the same
leading layer axis as the blocks; the effective weight of layer l is
    W_l + (alpha / r) * a_l @ b_l            (W as a matrix [in, out]).
The model is not changed: `merge` adds the update to the stacked kernels, so merged params
scan with the blocks as before, and training only the adapters differentiates the loss of
`merge(frozen_base, lora)` with respect to `lora`.

Targets are named as in our parameter tree (BFL names). Two single-block targets span two
of our kernels, because our layout splits BFL's fused linears (see jaxedit/models/flux.py):
`linear1` is linear1_qkv | linear1_mlp side by side on the output axis (diffusers to_q, to_k,
to_v, proj_mlp) and `linear2` is linear2_attn over linear2_mlp on the input axis (diffusers
proj_out over concat(attn, mlp)). One adapter covers the whole fused matrix, as a LoRA on
the BFL or diffusers module does.

`export_peft` writes the diffusers/PEFT layout `transformer.<module>.lora_A.weight` [r, in]
and `.lora_B.weight` [out, r] that `FluxKontextPipeline.load_lora_weights` accepts. An adapter
is a LoRA on its BFL module; the diffusers modules it splits into, and the rows (of lora_B) and
columns (of lora_A) each takes, are derived from the BFL and diffusers name tables
(`jaxedit.names.flux`, the converter's). alpha / r is folded into lora_B and no alphas are
written, so every loader (which then takes alpha = r, scale 1) applies exactly the merged update.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxedit.configs import FluxConfig
from jaxedit.names import flux as flux_names
from jaxedit.names import linear_pieces, split, weight_shape

Params = dict[str, Any]

DOUBLE_TARGETS = (
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.0",
    "txt_mlp.2",
)
SINGLE_TARGETS = ("linear1", "linear2")
ALL_TARGETS = DOUBLE_TARGETS + SINGLE_TARGETS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (update scale alpha / r) and the targets (names from ALL_TARGETS)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets {self.targets}: give distinct names from {ALL_TARGETS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class _Target:
    block: str  # "double_blocks" | "single_blocks"
    axis: str  # "out" | "in": the axis along which `kernels` sit side by side in the fused matrix
    kernels: tuple[str, ...]  # module paths under the block, in order along `axis`


_TARGETS = {
    "img_attn.qkv": _Target("double_blocks", "out", ("img_attn/qkv",)),
    "img_attn.proj": _Target("double_blocks", "out", ("img_attn/proj",)),
    "img_mlp.0": _Target("double_blocks", "out", ("img_mlp/0",)),
    "img_mlp.2": _Target("double_blocks", "out", ("img_mlp/2",)),
    "txt_attn.qkv": _Target("double_blocks", "out", ("txt_attn/qkv",)),
    "txt_attn.proj": _Target("double_blocks", "out", ("txt_attn/proj",)),
    "txt_mlp.0": _Target("double_blocks", "out", ("txt_mlp/0",)),
    "txt_mlp.2": _Target("double_blocks", "out", ("txt_mlp/2",)),
    "linear1": _Target("single_blocks", "out", ("linear1_qkv", "linear1_mlp")),
    "linear2": _Target("single_blocks", "in", ("linear2_attn", "linear2_mlp")),
}
assert tuple(_TARGETS) == ALL_TARGETS


def _kernels(params: Params, name: str) -> list:
    t, out = _TARGETS[name], []
    for path in t.kernels:
        node = params[t.block]
        for k in path.split("/"):
            node = node[k]
        out.append(node["kernel"])
    return out


def _check_adapters(lora: Params, cfg: LoraConfig) -> None:
    """The adapter tree holds exactly (a, b) for each of cfg.targets."""
    have = set(traverse_util.flatten_dict(lora))
    want = {(_TARGETS[n].block, *n.split("."), ab) for n in cfg.targets for ab in ("a", "b")}
    if have != want:
        extra, missing = sorted("/".join(p) for p in have - want), sorted("/".join(p) for p in want - have)
        raise ValueError(f"LoRA adapters do not match the targets {cfg.targets}: extra {extra}, missing {missing}")


def _adapter(lora: Params, name: str) -> tuple:
    """(a, b) of one target; the adapter tree mirrors the params tree: lora[block][..name parts..]."""
    node = lora[_TARGETS[name].block]
    for k in name.split("."):
        node = node[k]
    return node["a"], node["b"]


def _fused(name: str, kernels: list) -> tuple[list[int], tuple[int, int, int]]:
    """(widths of the kernels along the fused axis, (layers, in, out) of the fused matrix), shapes checked."""
    t = _TARGETS[name]
    shapes = [tuple(k.shape) for k in kernels]
    along = [s[1] if t.axis == "in" else math.prod(s[2:]) for s in shapes]
    other = {math.prod(s[2:]) if t.axis == "in" else s[1] for s in shapes}
    if len({s[0] for s in shapes}) != 1 or len(other) != 1:
        raise ValueError(f"LoRA target {name}: kernels {t.kernels} have shapes {shapes}, which do not fuse")
    layers, n_other = shapes[0][0], other.pop()
    return along, ((layers, sum(along), n_other) if t.axis == "in" else (layers, n_other, sum(along)))


def init_lora(params: Params, cfg: LoraConfig, key: jax.Array) -> Params:
    """Adapters for `params` (only shapes are read, so abstract trees work), float32:
    {"double_blocks": {"img_attn": {"qkv": {"a": [layers, in, r], "b": [layers, r, out]}}, ...}, ...}.

    a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform default), b = 0: merge(params, lora) == params.
    """
    shapes = {name: _fused(name, _kernels(params, name))[1] for name in cfg.targets}
    sizes = [layers * n_in * cfg.rank for layers, n_in, _ in shapes.values()]
    # one draw for all targets (a threefry per target makes XLA's CPU compile slow)
    u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    flat, start = {}, 0
    for (name, (layers, n_in, n_out)), size in zip(shapes.items(), sizes):
        path = (_TARGETS[name].block, *name.split("."))
        a = u[start : start + size].reshape(layers, n_in, cfg.rank) / np.float32(math.sqrt(n_in))
        flat[(*path, "a")], flat[(*path, "b")] = a, jnp.zeros((layers, cfg.rank, n_out), jnp.float32)
        start += size
    return traverse_util.unflatten_dict(flat)


def merge(params: Params, lora: Params, cfg: LoraConfig) -> Params:
    """params with every target kernel W replaced by W + (alpha / r) a @ b (cast to W's dtype): a
    new tree sharing the untouched leaves. Differentiable in both arguments.

    Each kernel's update is computed in the kernel's own shape ([layers, in, *features]), from its
    rows of a or columns of b, so it can be laid out (sharded) like the kernel.
    """
    _check_adapters(lora, cfg)
    flat = traverse_util.flatten_dict(params)
    for name in cfg.targets:
        t = _TARGETS[name]
        kernels = _kernels(params, name)
        along, (layers, n_in, n_out) = _fused(name, kernels)
        a, b = _adapter(lora, name)
        if a.shape != (layers, n_in, cfg.rank) or b.shape != (layers, cfg.rank, n_out):
            raise ValueError(f"LoRA {name}: a {a.shape}, b {b.shape} do not fit the matrix {(layers, n_in, n_out)}")
        start = 0
        for path, width, w in zip(t.kernels, along, kernels):
            a_k, b_k = (a[:, start : start + width], b) if t.axis == "in" else (a, b[:, :, start : start + width])
            b_k = b_k.reshape(layers, cfg.rank, *w.shape[2:])
            update = jnp.einsum("lir,lr...->li...", a_k, b_k, precision=jax.lax.Precision.HIGHEST)
            flat[(t.block, *path.split("/"), "kernel")] = w + (cfg.scale * update).astype(w.dtype)
            start += width
    return traverse_util.unflatten_dict(flat)


def _host(x) -> np.ndarray:
    """A (replicated) global array or any array -> numpy float32 on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError("export needs LoRA arrays replicated on every process")
        x = x.addressable_data(0)
    return np.asarray(x, np.float32)


@functools.lru_cache(maxsize=4)
def _linears(flux_cfg: FluxConfig) -> tuple[dict, dict]:
    """The `linear_pieces` of the BFL and the diffusers name tables of `Flux(flux_cfg)`."""
    from jaxedit.models import flux

    shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(flux.abstract_params(flux_cfg), sep="/").items()}
    return tuple(linear_pieces(flux_names.LAYOUTS[n](flux_cfg), shapes) for n in ("bfl", "diffusers"))


def peft_state_dict(lora: Params, cfg: LoraConfig, flux_cfg: FluxConfig, prefix: str = "transformer") -> dict:
    """{f"{prefix}.<diffusers module>.lora_A.weight": [r, in], "...lora_B.weight": [out, r]} float32 numpy,
    alpha / r folded into lora_B. The adapter of a target at a layer is a LoRA on that BFL module; the diffusers
    modules holding its weight, and which of its rows and columns each holds, come from the name tables
    (`jaxedit.names.split`): a fused target gives one entry per module (B sliced by rows, A by columns)."""
    _check_adapters(lora, cfg)
    bfl, diffusers = _linears(flux_cfg)
    out = {}
    for name in cfg.targets:
        t = _TARGETS[name]
        a, b = (_host(x) for x in _adapter(lora, name))
        b = b * np.float32(cfg.scale)
        for layer in range(a.shape[0]):
            module, down, up = f"{t.block}.{layer}.{name}", a[layer].T, b[layer].T  # BFL module: W += up @ down
            pieces = bfl.get(module, ())
            if not pieces or (up.shape[0], down.shape[1]) != weight_shape(pieces):
                raise ValueError(f"LoRA {name}: a {a.shape}, b {b.shape} do not fit the model's {module}")
            for theirs, rows, cols in split(pieces, diffusers, module):
                lora_a = np.concatenate([down[:, i:j] for _, (i, j) in cols], axis=1)
                lora_b = np.concatenate([up[i:j] for _, (i, j) in rows])
                out[f"{prefix}.{theirs}.lora_A.weight"] = np.ascontiguousarray(lora_a)
                out[f"{prefix}.{theirs}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    return out


def export_peft(lora: Params, cfg: LoraConfig, flux_cfg: FluxConfig, path: str | Path) -> Path:
    """Write `peft_state_dict` as safetensors (loadable by `FluxKontextPipeline.load_lora_weights`)."""
    from safetensors.numpy import save_file

    from jaxedit.staged import staged_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:  # a rerun's export replaces the file in one rename
        save_file(peft_state_dict(lora, cfg, flux_cfg), str(tmp), metadata={"format": "pt"})
    return path
