"""Where a torch Linear of a LoRA file sits in our parameters: module names -> `Update`s, from the name tables.

A LoRA term on torch Linear `X` (in BFL or diffusers names for the transformer, transformers' for CLIP and T5)
lands where the part's name table (`jaxedit.names`, the converter's tables) puts `X.weight`: each "linear"
rule of `X.weight` gives one of our kernels, its layer, the rows and columns of X's weight it holds and the box
of the kernel's outputs they fill (`jaxedit.names.linear_pieces`). So diffusers' to_q / to_k / to_v land on
thirds of our fused [D, 3, H*Dh] q/k/v kernels, proj_mlp on `linear1_mlp`, a single block's linear2 (proj_out)
on `linear2_attn` over `linear2_mlp` along its inputs, and norm_out.linear on final_layer.adaLN_modulation.1
with its two halves swapped, as the tables say. tests/test_lora_formats.py checks that a LoRA on every Linear
lands where the converter puts the same weights, kernel by kernel.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxedit.lora.apply import Update
from jaxedit.lora.formats import LoraError, Term
from jaxedit.names import Piece, linear_pieces, weight_shape
from jaxedit.names import flux as flux_names
from jaxedit.names import text as text_names

# part -> naming of its module names (`Term.naming`) -> the name table of that naming (a function of the
# part's config)
TABLES = {
    "transformer": flux_names.LAYOUTS,
    "clip": {"hf": text_names.clip_rules},
    "t5": {"hf": text_names.t5_rules},
}
# a prefix a part's module names may carry beyond the table's (CLIP's transformers < 5 wrapper)
PREFIXES = {"clip": text_names.CLIP_PREFIX}


def _table(part: str, naming: str, cfg):
    tables = TABLES.get(part, {})
    if naming not in tables:
        raise LoraError(f"no {naming} names for the {part}")
    return tables[naming](cfg)


def pieces(part: str, naming: str, cfg, shapes: dict) -> dict[str, tuple[Piece, ...]]:
    """{torch Linear module: the pieces of our kernels its weight fills} of a part in `naming`: its name table
    for `cfg` (the part's config), its kernels of `shapes` ({path: shape})."""
    return linear_pieces(_table(part, naming, cfg), shapes)


def module_names(part: str, naming: str, cfg) -> list[str]:
    """Every Linear module name of a part in `naming` (the modules of its name table for `cfg`), with the
    prefix its names may carry (CLIP: `text_model.`)."""
    modules = {r.src.removesuffix(".weight") for r in _table(part, naming, cfg) if r.transform == "linear"}
    return sorted(PREFIXES.get(part, "") + m for m in modules)


def kohya_table(part: str, naming: str, cfg) -> dict[str, str]:
    """{module name with dots spelt "_": module name} (kohya's names; CLIP also without `text_model.`)."""
    names = module_names(part, naming, cfg)
    if part in PREFIXES:
        names += [n.removeprefix(PREFIXES[part]) for n in names]
    table = {n.replace(".", "_"): n for n in names}
    assert len(table) == len(names), f"kohya names of the {part} collide"
    return table


def updates(terms: list[Term], part: str, cfg, shapes: dict, file: Path):
    """The `Update`s of one part from its terms (float32 numpy factors, scale folded into b); LoraError naming
    the file and the key for a module the part does not have or factors whose shapes do not fit it.
    cfg: the part's config (its name tables), shapes: {kernel path: shape} of its parameters."""
    index: dict[str, dict[str, tuple[Piece, ...]]] = {}
    groups: dict[tuple[str, tuple], dict[int | None, list]] = defaultdict(lambda: defaultdict(list))
    for t in terms:
        where = f"{file}: key {t.key}"
        if t.naming not in index:
            index[t.naming] = pieces(part, t.naming, cfg, shapes) if t.naming in TABLES.get(part, {}) else {}
        found = index[t.naming].get(t.module.removeprefix(PREFIXES.get(part, "")))
        if not found:
            raise LoraError(f"{where}: the model's {part} has no Linear {t.module!r} ({t.naming} name)")
        n_out, n_in = weight_shape(found)
        if t.down.shape[1] != n_in or t.up.shape[0] != n_out:
            raise LoraError(f"{where}: factors down {list(t.down.shape)}, up {list(t.up.shape)} do not fit "
                            f"{t.module} (in {n_in}, out {n_out}) at rank {t.down.shape[0]}")  # fmt: skip
        for p in found:
            a = t.down[:, p.cols[0] : p.cols[1]].T
            b = (np.float32(t.scale) * t.up[p.rows[0] : p.rows[1]]).T
            groups[p.param, p.box][p.layer].append((a, b.reshape(b.shape[0], *(e - s for s, e in p.box))))
    out = []
    for (param, box), by_layer in groups.items():
        shape, box_shape = shapes[param], tuple(e - s for s, e in box)
        r = max(sum(a.shape[1] for a, _ in ab) for ab in by_layer.values())
        if None in by_layer:  # not stacked: one matrix
            a, b = (np.concatenate(x, axis=i) for x, i in zip(zip(*by_layer[None]), (1, 0)))
            out.append(Update(param, box, np.ascontiguousarray(a), np.ascontiguousarray(b)))
            continue
        a = np.zeros((shape[0], shape[1], r), np.float32)  # layers the file leaves out: zero
        b = np.zeros((shape[0], r, *box_shape), np.float32)
        for layer, ab in by_layer.items():
            k = sum(x.shape[1] for x, _ in ab)
            a[layer, :, :k] = np.concatenate([x for x, _ in ab], axis=1)
            b[layer, :k] = np.concatenate([y for _, y in ab], axis=0)
        out.append(Update(param, box, a, b))
    return tuple(sorted(out, key=lambda u: (u.param, u.box)))
