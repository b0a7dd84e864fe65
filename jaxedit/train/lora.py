"""LoRA adapters on the projections of the DiT blocks: init, merge, export for diffusers/PEFT.

An adapter on a target is a pair a [layers, in, r], b [layers, r, out] stacked on the same
leading layer axis as the blocks; the effective weight of layer l is
    W_l + (alpha / r) * a_l @ b_l            (W as a matrix [in, out]).
The model is not changed: `merge` adds the update to the stacked kernels, so merged params
scan with the blocks as before, and training only the adapters differentiates the loss of
`merge(frozen_base, lora)` with respect to `lora`.

The targets are the model family's (`Family.lora_targets`: name -> `Target`, the kernels under a stack of
blocks). FLUX's (`FLUX_TARGETS`, the default of these functions) are named as in our parameter tree (BFL
names). Two single-block targets span two of our kernels, because our layout splits BFL's fused linears (see
jaxedit/models/flux.py): `linear1` is linear1_qkv | linear1_mlp side by side on the output axis (diffusers
to_q, to_k, to_v, proj_mlp) and `linear2` is linear2_attn over linear2_mlp on the input axis (diffusers
proj_out over concat(attn, mlp)). One adapter covers the whole fused matrix, as a LoRA on the BFL or diffusers
module does. Qwen-Image's are its blocks' attention and MLP Linears (`attn.to_q`, ..., `img_mlp.0`, ...).

`export_peft` writes the diffusers/PEFT layout `transformer.<module>.lora_A.weight` [r, in]
and `.lora_B.weight` [out, r] that the diffusers pipelines' `load_lora_weights` accept. An adapter
is a LoRA on one torch module of the name table the family names its adapters in (`Family.lora_naming`:
FLUX's BFL table, Qwen-Image's diffusers table): the module whose weight our target's kernels hold; the
diffusers modules it splits into, and the rows (of lora_B) and columns (of lora_A) each takes, are derived
from that table and the diffusers table (`jaxedit.names`, the converter's). alpha / r is folded into lora_B
and no alphas are written, so every loader (which then takes alpha = r, scale 1) applies exactly the merged
update.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxedit import configs, families
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
ALL_TARGETS = DOUBLE_TARGETS + SINGLE_TARGETS  # FLUX's


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (update scale alpha / r) and the targets (None: every target of the model's family; names
    from its `Family.lora_targets`, e.g. FLUX's ALL_TARGETS)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.targets is None:
            return
        known = sorted({n for f in families.all_families() for n in f.lora_targets()})
        unknown = [t for t in self.targets if t not in known]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets {self.targets}: give distinct names from {', '.join(known)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def names(self, table: Mapping[str, Target]) -> tuple[str, ...]:
        """The targets of a family's `table`: all of them (targets None), or those given, each checked."""
        if self.targets is None:
            return tuple(table)
        unknown = [t for t in self.targets if t not in table]
        if unknown:
            raise ValueError(f"LoRA targets {', '.join(unknown)} are not this model's: use {', '.join(table)}")
        return self.targets


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapter's place: `kernels` (module paths under the stack `block`, in order along `axis`) side by side
    in the fused matrix the adapter is a LoRA on."""

    block: str  # the stack of blocks: "double_blocks" | "single_blocks" (FLUX), "transformer_blocks" (Qwen-Image)
    axis: str  # "out" | "in": the axis along which `kernels` sit side by side in the fused matrix
    kernels: tuple[str, ...]  # module paths under the block, in order along `axis`


_Target = Target
FLUX_TARGETS = {
    "img_attn.qkv": Target("double_blocks", "out", ("img_attn/qkv",)),
    "img_attn.proj": Target("double_blocks", "out", ("img_attn/proj",)),
    "img_mlp.0": Target("double_blocks", "out", ("img_mlp/0",)),
    "img_mlp.2": Target("double_blocks", "out", ("img_mlp/2",)),
    "txt_attn.qkv": Target("double_blocks", "out", ("txt_attn/qkv",)),
    "txt_attn.proj": Target("double_blocks", "out", ("txt_attn/proj",)),
    "txt_mlp.0": Target("double_blocks", "out", ("txt_mlp/0",)),
    "txt_mlp.2": Target("double_blocks", "out", ("txt_mlp/2",)),
    "linear1": Target("single_blocks", "out", ("linear1_qkv", "linear1_mlp")),
    "linear2": Target("single_blocks", "in", ("linear2_attn", "linear2_mlp")),
}
assert tuple(FLUX_TARGETS) == ALL_TARGETS
_TARGETS = FLUX_TARGETS
Targets = Mapping[str, Target]


def _kernels(params: Params, t: Target) -> list:
    out = []
    for path in t.kernels:
        node = params[t.block]
        for k in path.split("/"):
            node = node[k]
        out.append(node["kernel"])
    return out


def _check_adapters(lora: Params, names: tuple[str, ...], table: Targets) -> None:
    """The adapter tree holds exactly (a, b) for each of the targets `names`."""
    have = set(traverse_util.flatten_dict(lora))
    want = {(table[n].block, *n.split("."), ab) for n in names for ab in ("a", "b")}
    if have != want:
        extra, missing = sorted("/".join(p) for p in have - want), sorted("/".join(p) for p in want - have)
        raise ValueError(f"LoRA adapters do not match the targets {names}: extra {extra}, missing {missing}")


def _adapter(lora: Params, name: str, t: Target) -> tuple:
    """(a, b) of one target; the adapter tree mirrors the params tree: lora[block][..name parts..]."""
    node = lora[t.block]
    for k in name.split("."):
        node = node[k]
    return node["a"], node["b"]


def _fused(name: str, t: Target, kernels: list) -> tuple[list[int], tuple[int, int, int]]:
    """(widths of the kernels along the fused axis, (layers, in, out) of the fused matrix), shapes checked."""
    shapes = [tuple(k.shape) for k in kernels]
    along = [s[1] if t.axis == "in" else math.prod(s[2:]) for s in shapes]
    other = {math.prod(s[2:]) if t.axis == "in" else s[1] for s in shapes}
    if len({s[0] for s in shapes}) != 1 or len(other) != 1:
        raise ValueError(f"LoRA target {name}: kernels {t.kernels} have shapes {shapes}, which do not fuse")
    layers, n_other = shapes[0][0], other.pop()
    return along, ((layers, sum(along), n_other) if t.axis == "in" else (layers, n_other, sum(along)))


def init_lora(params: Params, cfg: LoraConfig, key: jax.Array, table: Targets = FLUX_TARGETS) -> Params:
    """Adapters for `params` (only shapes are read, so abstract trees work) on cfg's targets of the family's
    `table`, float32: {"double_blocks": {"img_attn": {"qkv": {"a": [layers, in, r], "b": [layers, r, out]}}, ...},
    ...}.

    a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform default), b = 0: merge(params, lora) == params.
    """
    shapes = {name: _fused(name, table[name], _kernels(params, table[name]))[1] for name in cfg.names(table)}
    sizes = [layers * n_in * cfg.rank for layers, n_in, _ in shapes.values()]
    # one draw for all targets (a threefry per target makes XLA's CPU compile slow)
    u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    flat, start = {}, 0
    for (name, (layers, n_in, n_out)), size in zip(shapes.items(), sizes):
        path = (table[name].block, *name.split("."))
        a = u[start : start + size].reshape(layers, n_in, cfg.rank) / np.float32(math.sqrt(n_in))
        flat[(*path, "a")], flat[(*path, "b")] = a, jnp.zeros((layers, cfg.rank, n_out), jnp.float32)
        start += size
    return traverse_util.unflatten_dict(flat)


def merge(params: Params, lora: Params, cfg: LoraConfig, table: Targets = FLUX_TARGETS) -> Params:
    """params with every target kernel W replaced by W + (alpha / r) a @ b (cast to W's dtype): a
    new tree sharing the untouched leaves. Differentiable in both arguments. table: the family's targets.

    Each kernel's update is computed in the kernel's own shape ([layers, in, *features]), from its
    rows of a or columns of b, so it can be laid out (sharded) like the kernel.
    """
    names = cfg.names(table)
    _check_adapters(lora, names, table)
    flat = traverse_util.flatten_dict(params)
    for name in names:
        t = table[name]
        kernels = _kernels(params, t)
        along, (layers, n_in, n_out) = _fused(name, t, kernels)
        a, b = _adapter(lora, name, t)
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


def _preset(model: Any) -> configs.Preset:
    """A preset, or the preset of a bare transformer config (`families.transformer_preset`)."""
    return model if isinstance(model, configs.Preset) else families.transformer_preset(model)


@functools.lru_cache(maxsize=4)
def _linears(preset: configs.Preset) -> tuple[dict, dict, dict]:
    """(the `linear_pieces` of the table the family names its adapters in and of the diffusers table of the
    preset's transformer, {frozenset of (kernel, layer) a module's weight fills: that module} of the former)."""
    family = families.of(preset)
    params = family.abstract_params(preset, "transformer")
    shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    own, diffusers = (linear_pieces(family.lora_table(preset, "transformer", n), shapes)
                      for n in (family.lora_naming, "diffusers"))  # fmt: skip
    return own, diffusers, {frozenset((p.param, p.layer) for p in pieces): m for m, pieces in own.items()}


def peft_state_dict(lora: Params, cfg: LoraConfig, model: Any, prefix: str = "transformer") -> dict:
    """{f"{prefix}.<diffusers module>.lora_A.weight": [r, in], "...lora_B.weight": [out, r]} float32 numpy,
    alpha / r folded into lora_B. model: the preset (or its transformer's config) whose family's targets the
    adapters are on. The adapter of a target at a layer is a LoRA on the module (of the table the family names
    its adapters in: FLUX's BFL, Qwen-Image's diffusers) whose weight the target's kernels hold; the diffusers
    modules holding that weight, and which of its rows and columns each holds, come from the name tables
    (`jaxedit.names.split`): a fused target gives one entry per module (B sliced by rows, A by columns)."""
    preset = _preset(model)
    table = families.of(preset).lora_targets()
    names = cfg.names(table)
    _check_adapters(lora, names, table)
    own, diffusers, module_of = _linears(preset)
    out = {}
    for name in names:
        t = table[name]
        a, b = (_host(x) for x in _adapter(lora, name, t))
        b = b * np.float32(cfg.scale)
        for layer in range(a.shape[0]):
            down, up = a[layer].T, b[layer].T  # the module's W += up @ down
            module = module_of.get(frozenset((f"{t.block}/{k}/kernel", layer) for k in t.kernels))
            pieces = own.get(module, ())
            if not pieces or (up.shape[0], down.shape[1]) != weight_shape(pieces):
                raise ValueError(f"LoRA {name}: a {a.shape}, b {b.shape} do not fit the model's {module or name}")
            for theirs, rows, cols in split(pieces, diffusers, module):
                lora_a = np.concatenate([down[:, i:j] for _, (i, j) in cols], axis=1)
                lora_b = np.concatenate([up[i:j] for _, (i, j) in rows])
                out[f"{prefix}.{theirs}.lora_A.weight"] = np.ascontiguousarray(lora_a)
                out[f"{prefix}.{theirs}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    return out


def export_peft(lora: Params, cfg: LoraConfig, model: Any, path: str | Path) -> Path:
    """Write `peft_state_dict` as safetensors (loadable by the family's diffusers pipeline's `load_lora_weights`,
    e.g. `FluxKontextPipeline`, `QwenImageEditPlusPipeline`). model: the preset or its transformer's config."""
    from safetensors.numpy import save_file

    from jaxedit.staged import staged_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:  # a rerun's export replaces the file in one rename
        save_file(peft_state_dict(lora, cfg, model), str(tmp), metadata={"format": "pt"})
    return path
