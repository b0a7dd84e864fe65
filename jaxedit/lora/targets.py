"""Where a torch Linear of a LoRA file sits in our parameters: module names -> `Update`s, from the name tables.

A LoRA term on torch Linear `X` (of a part, in one of the namings its files use: BFL or diffusers names for the
FLUX transformer, transformers' for CLIP and T5, diffusers' for the Qwen-Image DiT) lands where the name table
the model's family names for that part and naming (`Family.lora_table`: a `jaxedit.names` table, the
converter's) puts `X.weight`: each "linear" rule of `X.weight` gives one of our kernels, its layer, the rows
and columns of X's weight it holds and the box of the kernel's outputs they fill
(`jaxedit.names.linear_pieces`). So diffusers' FLUX to_q / to_k / to_v land on thirds of our fused
[D, 3, H*Dh] q/k/v kernels, proj_mlp on `linear1_mlp`, a single block's linear2 (proj_out) on `linear2_attn`
over `linear2_mlp` along its inputs, and norm_out.linear on final_layer.adaLN_modulation.1 with its two halves
swapped, as the tables say. tests/test_lora_formats.py and tests/test_qwen_image_lora.py check that a LoRA on
every Linear lands where the converter puts the same weights, kernel by kernel.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxedit import configs, families
from jaxedit.lora.apply import Update
from jaxedit.lora.formats import LoraError, Term
from jaxedit.names import Piece, Rule, linear_pieces, weight_shape


def table(preset: configs.Preset, part: str, naming: str) -> list[Rule]:
    """The name table of the preset's `part` in `naming` (its family's `lora_table`); LoraError if it has none."""
    rules = families.of(preset).lora_table(preset, part, naming)
    if rules is None:
        raise LoraError(f"no {naming} names for the {part}")
    return rules


def module_prefix(preset: configs.Preset, part: str) -> str:
    """A prefix the part's module names may carry beyond its table's (CLIP: `text_model.`)."""
    return families.of(preset).lora_keys().module_prefixes.get(part, "")


def pieces(preset: configs.Preset, part: str, naming: str, shapes: dict) -> dict[str, tuple[Piece, ...]]:
    """{torch Linear module: the pieces of our kernels its weight fills} of a part in `naming`: its name table
    for the preset, its kernels of `shapes` ({path: shape})."""
    return linear_pieces(table(preset, part, naming), shapes)


def module_names(preset: configs.Preset, part: str, naming: str) -> list[str]:
    """Every Linear module name of a part in `naming` (the modules of its name table), with the prefix its
    names may carry (CLIP: `text_model.`)."""
    modules = {r.src.removesuffix(".weight") for r in table(preset, part, naming) if r.transform == "linear"}
    return sorted(module_prefix(preset, part) + m for m in modules)


def kohya_table(preset: configs.Preset, part: str, naming: str) -> dict[str, str]:
    """{module name with dots spelt "_": module name} (kohya's names; CLIP also without `text_model.`)."""
    names, prefix = module_names(preset, part, naming), module_prefix(preset, part)
    if prefix:
        names += [n.removeprefix(prefix) for n in names]
    out = {n.replace(".", "_"): n for n in names}
    assert len(out) == len(names), f"kohya names of the {part} collide"
    return out


def updates(terms: list[Term], preset: configs.Preset, part: str, shapes: dict, file: Path):
    """The `Update`s of one part from its terms (float32 numpy factors, scale folded into b); LoraError naming
    the file and the key for a module the part does not have or factors whose shapes do not fit it.
    preset: the model (its family's name tables), shapes: {kernel path: shape} of the part's parameters."""
    family, prefix = families.of(preset), module_prefix(preset, part)
    index: dict[str, dict[str, tuple[Piece, ...]]] = {}
    groups: dict[tuple[str, tuple], dict[int | None, list]] = defaultdict(lambda: defaultdict(list))
    for t in terms:
        where = f"{file}: key {t.key}"
        if t.naming not in index:
            rules = family.lora_table(preset, part, t.naming)
            index[t.naming] = {} if rules is None else linear_pieces(rules, shapes)
        found = index[t.naming].get(t.module.removeprefix(prefix))
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
