"""Name tables: which torch tensor fills which of our parameters, as data, one table per model.

A table is a list of `Rule`s, each copying one torch tensor (or a rectangular part of it) into one of our
parameters (or a rectangular part of it, at one layer of a stacked parameter), through a named transform:

    "copy"            as it is
    "linear"          torch Linear weight [out, in] -> Dense kernel [in, *out] (transposed)
    "conv"            torch Conv2d weight [O, I, kh, kw] -> [kh, kw, I, O]
    "conv1x1_linear"  a 1x1 Conv2d weight [O, I, 1, 1] -> Dense kernel [I, O]
    "patch_linear"    a conv with stride = kernel, on flattened patches -> [I * prod(kernel), O]

The tables live beside each other here, one module per model (`flux`: BFL and diffusers layouts of the FLUX
transformer; `text`: transformers' CLIP and T5 encoders; `step1x`: Step1X-Edit's file, the BFL DiT plus its
Qwen2 connector; `vae`: BFL and diffusers layouts of the FLUX VAE; `qwen2_5_vl`: transformers' Qwen2.5-VL;
`qwen_image`: diffusers' Qwen-Image DiT), and everything that needs the torch <-> jaxedit correspondence
derives from them: the converter (`checkpoints_convert`: strict plans over file sources, transforms,
streaming), where a LoRA on a torch Linear lands (`linear_pieces`, used by `jaxedit.lora.targets` with the
table a model's family names for each part and naming: `Family.lora_table`) and how our trained adapters
split into another naming's modules (`split`, used by `jaxedit.train.lora`'s PEFT export). No jax or numpy
here.

A table is a function of the model's config returning its rules (a model whose files come in several layouts
has one per layout: `LAYOUTS`, layout -> function); a new model's table is one more module here, written with
`linear` (a torch Linear, or a row / column part of a fused one, into a Dense kernel, an output box of it, at a
layer of a stacked kernel), `copy` and `Rule`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

Index = tuple[Any, ...]  # ints and slices
Box = tuple[tuple[int, int], ...]  # (start, stop) per axis


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


# ---------------------------------------------------------------------------------------
# What a table says about torch Linears


@dataclasses.dataclass(frozen=True)
class Piece:
    """The part of a torch Linear's weight [out, in] one of our kernels holds: its rows and columns land at
    `layer` of the stacked kernel `param` (None: not stacked), on `box` of the kernel's output axes (rows in
    the box's row-major order; columns are the kernel's inputs, all of them)."""

    param: str
    layer: int | None
    rows: tuple[int, int]
    cols: tuple[int, int]
    box: Box


def _span(ix: slice, n: int, what: str) -> tuple[int, int]:
    """(start, stop) of a table's slice over a torch axis whose part has n entries."""
    start = ix.start or 0
    if ix.step not in (None, 1) or start < 0 or ix.stop not in (None, start + n):
        raise ValueError(f"{what}: slice {ix} does not select {n} entries")
    return start, start + n


def _piece(rule: Rule, shapes: Mapping[str, tuple[int, ...]]) -> Piece:
    shape = shapes.get(rule.dst)
    if shape is None:
        raise ValueError(f"name table: {rule.src} goes to {rule.dst}, which the model does not have")
    core = tuple(shape[1:] if rule.layer is not None else shape)
    in_index, *out_index = rule.dst_index or (slice(None),)
    if in_index != slice(None) or len(out_index) > len(core) - 1:
        raise ValueError(f"name table: {rule.src} -> {rule.dst}: a Linear fills all the kernel's inputs")
    box = []
    for i, n in enumerate(core[1:]):
        ix = out_index[i] if i < len(out_index) else slice(None)
        if isinstance(ix, slice):
            start, stop, step = ix.indices(n)
            if step != 1:
                raise ValueError(f"name table: {rule.src} -> {rule.dst}: strided output slice {ix}")
            box.append((start, stop))
        else:
            box.append((int(ix), int(ix) + 1))
    rows, cols = rule.src_index or (slice(None), slice(None))
    n_rows = math.prod(b - a for a, b in box)
    return Piece(rule.dst, rule.layer, _span(rows, n_rows, rule.src), _span(cols, core[0], rule.src), tuple(box))


def _joined(p: Piece, q: Piece) -> Piece | None:
    """p and q as one piece when q continues p: the same kernel, layer and columns, q's rows right after p's,
    q's box right after p's along one axis with all earlier axes one wide (rows stay in row-major order)."""
    if (p.param, p.layer, p.cols) != (q.param, q.layer, q.cols) or p.rows[1] != q.rows[0]:
        return None
    diff = [i for i, (a, b) in enumerate(zip(p.box, q.box)) if a != b]
    if len(diff) != 1 or p.box[diff[0]][1] != q.box[diff[0]][0]:
        return None
    k = diff[0]
    if any(b - a != 1 for a, b in p.box[:k]):
        return None
    box = (*p.box[:k], (p.box[k][0], q.box[k][1]), *p.box[k + 1 :])
    return Piece(p.param, p.layer, (p.rows[0], q.rows[1]), p.cols, box)


def linear_pieces(rules: Iterable[Rule], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Piece, ...]]:
    """{torch Linear module (`X` of a rule for `X.weight`): the pieces of our kernels its weight fills} from a
    table's "linear" rules, given our parameter shapes ({path: shape}). A part of a weight the table splits
    but that is one box of one kernel is one piece (BFL's fused qkv: rows 0:3h as [3, h])."""
    out: dict[str, list[Piece]] = defaultdict(list)
    for r in rules:
        if r.transform == "linear":
            module = r.src.removesuffix(".weight")
            if module == r.src:
                raise ValueError(f"name table: a Linear rule reads {r.src}, not a `.weight`")
            out[module].append(_piece(r, shapes))
    for module, pieces in out.items():
        pieces.sort(key=lambda p: (p.cols, p.rows))
        joined = [pieces[0]]
        for q in pieces[1:]:
            joined[-1:] = [j] if (j := _joined(joined[-1], q)) else [joined[-1], q]
        out[module] = joined
    return {m: tuple(p) for m, p in out.items()}


def weight_shape(pieces: Iterable[Piece]) -> tuple[int, int]:
    """[out, in] of the torch Linear weight whose `linear_pieces` are `pieces`."""
    pieces = list(pieces)
    return max(p.rows[1] for p in pieces), max(p.cols[1] for p in pieces)


def _rows_in(box: Box, sub: Box) -> tuple[int, int] | None:
    """The row-major positions [start, stop) of `sub` inside `box`, None unless they are contiguous."""
    # contiguous: one-wide axes, then a range on one axis j, then whole axes
    j = next((i for i, (c, d) in enumerate(sub) if d - c != 1), len(sub) - 1)
    if sub[j + 1 :] != box[j + 1 :]:
        return None
    start, stride = 0, 1
    for (a, b), (c, _) in reversed(list(zip(box, sub))):
        start += (c - a) * stride
        stride *= b - a
    return start, start + math.prod(d - c for c, d in sub)


def _overlap(a: Box, b: Box) -> Box | None:
    box = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return box if all(lo < hi for lo, hi in box) else None


Segment = tuple[tuple[int, int], tuple[int, int]]  # (their range, our range) along one torch axis


def split(
    pieces: tuple[Piece, ...], others: Mapping[str, tuple[Piece, ...]], what: str = "module"
) -> list[tuple[str, list[Segment], list[Segment]]]:
    """How a torch Linear whose weight fills `pieces` is held by the modules of another naming (`others`, its
    `linear_pieces`): [(module, row segments, column segments)] in the order of the first rows they take, each
    module's weight being the grid `ours[row range, column range]` of its segments (their weight's rows
    `their range` are ours `our range`). ValueError naming `what` unless the other modules lie wholly inside
    this weight, each as whole row and column ranges."""
    where = {(p.param, p.layer) for p in pieces}
    found: dict[str, tuple[list[Segment], list[Segment]]] = {}
    for module, theirs in others.items():
        if not any((q.param, q.layer) in where for q in theirs):
            continue
        cells, inside = [], 0
        for q in theirs:
            for p in pieces:
                box = _overlap(p.box, q.box) if (p.param, p.layer) == (q.param, q.layer) else None
                if box is None:
                    continue
                ours, their = _rows_in(p.box, box), _rows_in(q.box, box)
                if ours is None or their is None:
                    raise ValueError(f"{what}: {module} holds rows of it that are no range of its rows")
                rows = ((q.rows[0] + their[0], q.rows[0] + their[1]), (p.rows[0] + ours[0], p.rows[0] + ours[1]))
                cells.append((rows, (q.cols, p.cols)))
                inside += math.prod(b - a for a, b in box)
        if not cells:
            continue
        if inside != sum(math.prod(b - a for a, b in q.box) for q in theirs):
            raise ValueError(f"{what}: {module} also holds weights from outside it")
        row_segs, col_segs = sorted({r for r, _ in cells}), sorted({c for _, c in cells})
        grid = {(r, c) for r in row_segs for c in col_segs}
        if (
            len({r[0] for r in row_segs}) != len(row_segs)
            or len({c[0] for c in col_segs}) != len(col_segs)
            or (set(cells) != grid or len(cells) != len(grid))
        ):
            raise ValueError(f"{what}: {module} is no grid of row and column ranges of it")
        found[module] = (row_segs, col_segs)
    return sorted(((m, r, c) for m, (r, c) in found.items()), key=lambda x: min(o[0] for _, o in x[1]))
