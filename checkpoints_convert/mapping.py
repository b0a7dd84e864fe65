"""Strict, declarative mapping from a PyTorch state dict onto a Flax parameter tree.

A table is a list of `Rule`s (`jaxedit.names`, where the tables live; `Rule`, `linear` and `copy` are
re-exported here). Each rule copies one source tensor (or a rectangular part of it) into one target
parameter (or a rectangular part of it, optionally at one layer of a stacked parameter), through a small
named transform, whose implementation is here (`TRANSFORMS`). `plan` checks a table
against shapes only (no data: works on manifests and `jax.eval_shape` trees) and
raises on any unknown source key, any part of a target left unfilled or filled twice,
any part of a source left unused, and any shape mismatch, naming the key. `convert`
then streams the tensors, one target parameter at a time. A `Check` in a table names a
known source tensor that is verified rather than written (a tied weight saved twice, a
saved buffer); it counts as used. An `Unused` names a source tensor, or a rectangular part of one,
that is deliberately dropped (a part of a weight the model never applies, e.g. the time taps of a
causal 3-D conv run on one frame): it counts as used, and must not overlap what the rules read.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from jaxedit.names import Index, Rule, copy, linear

__all__ = ["TRANSFORMS", "Check", "ConversionError", "Index", "Plan", "Rule", "convert", "copy", "flatten", "linear",
           "plan", "run_check", "unflatten"]  # fmt: skip


class ConversionError(ValueError):
    """A checkpoint does not match the model: names the offending key(s) and file."""


def _transpose_linear(a: np.ndarray) -> np.ndarray:
    if a.ndim != 2:
        raise ValueError(f"a linear weight must be 2-D, got shape {a.shape}")
    return a.T


def _conv_to_hwio(a: np.ndarray) -> np.ndarray:
    if a.ndim != 4:
        raise ValueError(f"a conv weight must be 4-D [O, I, kh, kw], got shape {a.shape}")
    return a.transpose(2, 3, 1, 0)


def _patch_to_linear(a: np.ndarray) -> np.ndarray:
    if a.ndim < 3:
        raise ValueError(f"a patch-embedding conv weight must be [O, I, *kernel], got shape {a.shape}")
    return a.reshape(a.shape[0], -1).T


def _conv1x1_to_linear(a: np.ndarray) -> np.ndarray:
    if a.ndim != 4 or a.shape[2:] != (1, 1):
        raise ValueError(f"a 1x1 conv weight must be [O, I, 1, 1], got shape {a.shape}")
    return a[:, :, 0, 0].T


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "linear": _transpose_linear,  # torch Linear [out, in] -> kernel [in, out]
    "conv": _conv_to_hwio,  # torch Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
    "conv1x1_linear": _conv1x1_to_linear,  # 1x1 Conv2d [O, I, 1, 1] -> Dense kernel [I, O]
    "patch_linear": _patch_to_linear,  # a conv with stride = kernel on flattened patches -> [I * prod(kernel), O]
}

_TRANSFORM_SHAPES: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "copy": lambda s: s,
    "linear": lambda s: s[::-1] if len(s) == 2 else None,
    "conv": lambda s: (s[2], s[3], s[1], s[0]) if len(s) == 4 else None,
    "conv1x1_linear": lambda s: (s[1], s[0]) if len(s) == 4 and s[2:] == (1, 1) else None,
    "patch_linear": lambda s: (int(np.prod(s[1:])), s[0]) if len(s) >= 3 else None,
}


@dataclasses.dataclass(frozen=True)
class Check:
    """A known source tensor that is verified, not written: it must equal source tensor
    `equals` (a tied weight saved twice) or `value(shape)` (a saved buffer, e.g. position
    ids). `plan` counts it as used; `convert` verifies it before writing anything."""

    src: str
    equals: str | None = None
    value: Callable[[tuple[int, ...]], np.ndarray] | None = None
    why: str = ""

    def __post_init__(self):
        if (self.equals is None) == (self.value is None):
            raise ValueError(f"Check({self.src!r}): give exactly one of `equals` or `value`")


@dataclasses.dataclass(frozen=True)
class Unused:
    """A known source tensor (`index` = () for all of it) or a rectangular part of one that is deliberately
    not converted; `why` says why the model does not need it. `plan` counts it as used (so the source is
    still covered exactly: no overlap with the rules' parts); `convert` never reads it."""

    src: str
    index: Index = ()
    why: str = ""

    def __post_init__(self):
        if not self.why:
            raise ValueError(f"Unused({self.src!r}): say `why` the tensor is dropped")


# ---------------------------------------------------------------------------------------
# Shape-only checking


def _box(index: Index, shape: tuple[int, ...], what: str) -> tuple[tuple[int, int], ...]:
    """The rectangular region `index` selects in `shape`, as (start, stop) per dimension."""
    if len(index) > len(shape):
        raise ConversionError(f"{what}: index {index} has more axes than shape {shape}")
    box = []
    for i, n in enumerate(shape):
        ix = index[i] if i < len(index) else slice(None)
        if isinstance(ix, slice):
            start, stop, step = ix.indices(n)
            if step != 1 or stop <= start:
                raise ConversionError(f"{what}: empty or strided slice {ix} on axis of size {n}")
            box.append((start, stop))
        else:
            if not 0 <= int(ix) < n:
                raise ConversionError(f"{what}: index {ix} out of range for axis of size {n}")
            box.append((int(ix), int(ix) + 1))
    return tuple(box)


def _box_shape(box, index: Index) -> tuple[int, ...]:
    """Shape of the selection (integer-indexed axes dropped)."""
    dims = []
    for i, (a, b) in enumerate(box):
        ix = index[i] if i < len(index) else slice(None)
        if isinstance(ix, slice):
            dims.append(b - a)
    return tuple(dims)


def _overlap(a, b) -> bool:
    return all(x0 < y1 and y0 < x1 for (x0, x1), (y0, y1) in zip(a, b))


def _check_exact_cover(boxes: list, shape: tuple[int, ...], what: str, describe: Callable[[int], str]):
    """Boxes must be pairwise disjoint and together cover `shape` exactly."""
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            if _overlap(boxes[i], boxes[j]):
                raise ConversionError(f"{what}: written twice, by {describe(i)} and {describe(j)}")
    total = sum(int(np.prod([b - a for a, b in box])) for box in boxes)
    if total != int(np.prod(shape)):
        raise ConversionError(f"{what}: only {total} of {int(np.prod(shape))} elements are filled (shape {shape})")


@dataclasses.dataclass
class Plan:
    rules: list[Rule]
    target_shapes: dict[str, tuple[int, ...]]
    by_target: dict[str, list[Rule]]
    checks: list[Check] = dataclasses.field(default_factory=list)
    check_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    fmt: str | None = None  # the source layout the rules were built for
    checked: bool = False  # its checks already ran against the source (`open_part`)


def plan(
    rules: Iterable[Rule | Check | Unused],
    source_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[str, tuple[int, ...]],
    *,
    source_name: str = "checkpoint",
    ignore: Callable[[str], bool] | None = None,
) -> Plan:
    """Check `rules` against shapes; raise ConversionError naming every problem found first."""
    rules = list(rules)
    checks = [r for r in rules if isinstance(r, Check)]
    unused = [r for r in rules if isinstance(r, Unused)]
    rules = [r for r in rules if isinstance(r, Rule)]
    source_shapes = {k: tuple(v) for k, v in source_shapes.items()}
    target_shapes = {k: tuple(v) for k, v in target_shapes.items()}

    used = {r.src for r in rules} | {c.src for c in checks} | {u.src for u in unused}
    unknown = sorted(k for k in source_shapes if k not in used and not (ignore and ignore(k)))
    if unknown:
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise ConversionError(
            f"{source_name}: {len(unknown)} tensor(s) the model has no place for: {', '.join(unknown[:10])}{more}"
        )
    missing_src = sorted({r.src for r in [*rules, *checks, *unused] if r.src not in source_shapes})
    missing_src += sorted({c.equals for c in checks if c.equals and c.equals not in source_shapes})
    if missing_src:
        more = f" (and {len(missing_src) - 10} more)" if len(missing_src) > 10 else ""
        raise ConversionError(f"{source_name}: missing tensor(s) {', '.join(missing_src[:10])}{more}")
    bad_dst = sorted({r.dst for r in rules if r.dst not in target_shapes})
    if bad_dst:
        raise ConversionError(f"conversion table names unknown model parameter(s): {', '.join(bad_dst[:10])}")
    for c in checks:
        if c.src in {r.src for r in [*rules, *unused]} or sum(d.src == c.src for d in checks) > 1:
            raise ConversionError(f"conversion table: {c.src} is both checked and used elsewhere")
        if c.equals and source_shapes[c.src] != source_shapes[c.equals]:
            raise ConversionError(
                f"{source_name}: {c.src} {source_shapes[c.src]} should duplicate {c.equals} "
                f"{source_shapes[c.equals]} ({c.why or 'tied'}) but the shapes differ"
            )

    src_boxes: dict[str, list] = defaultdict(list)
    dst_boxes: dict[str, list] = defaultdict(list)
    by_target: dict[str, list[Rule]] = defaultdict(list)
    for r in rules:
        sshape = source_shapes[r.src]
        sbox = _box(r.src_index, sshape, f"{source_name}: {r.src}")
        part = _TRANSFORM_SHAPES[r.transform](_box_shape(sbox, r.src_index))
        if part is None:
            raise ConversionError(
                f"{source_name}: {r.src} has shape {sshape}, which a {r.transform!r} transform cannot take"
            )
        tshape = target_shapes[r.dst]
        dst_index = r.dst_index if r.layer is None else (r.layer, *r.dst_index)
        dbox = _box(dst_index, tshape, f"parameter {r.dst}")
        want = _box_shape(dbox, dst_index)
        if part != want:
            raise ConversionError(
                f"{source_name}: shape mismatch for {r.src} {sshape} -> {r.dst} {tshape}"
                f"{'' if r.layer is None else f' layer {r.layer}'}: converted part is {part}, the model expects {want}"
            )
        src_boxes[r.src].append(sbox)
        dst_boxes[r.dst].append(dbox)
        by_target[r.dst].append(r)
    for u in unused:
        src_boxes[u.src].append(_box(u.index, source_shapes[u.src], f"{source_name}: {u.src} (unused part)"))

    unfilled = sorted(k for k in target_shapes if k not in dst_boxes)
    if unfilled:
        more = f" (and {len(unfilled) - 10} more)" if len(unfilled) > 10 else ""
        raise ConversionError(f"{source_name}: no tensor fills model parameter(s) {', '.join(unfilled[:10])}{more}")
    for dst, boxes in dst_boxes.items():
        rs = by_target[dst]
        _check_exact_cover(boxes, target_shapes[dst], f"parameter {dst}", lambda i, rs=rs: rs[i].src)
    for src, boxes in src_boxes.items():
        _check_exact_cover(boxes, source_shapes[src], f"{source_name}: tensor {src}", lambda i, src=src: src)
    return Plan(rules, target_shapes, dict(by_target), checks, {c.src: source_shapes[c.src] for c in checks})


# ---------------------------------------------------------------------------------------
# Streaming conversion


def convert(
    the_plan: Plan,
    read: Callable[[str, Index], np.ndarray],
    *,
    dtype: Any = None,
    source_dtype: Callable[[str], Any] | None = None,
    place: Callable[[str, np.ndarray], Any] = lambda path, a: a,
) -> dict[str, Any]:
    """Fill every target parameter from the source, one parameter at a time.

    read(key, index) returns `source[key][index]` as numpy (reading only that part);
    dtype: output dtype, or None to keep the source dtype (float32 if parts disagree);
    place(path, array) turns the finished host array into what the tree holds (e.g. a
    device array on a sharding); the host buffer is dropped right after, so peak host
    memory is about one parameter beyond what `place` keeps.
    Returns {path: placed array}. The plan's `Check`s are verified first (ConversionError) unless they
    already were (`the_plan.checked`).
    """
    for c in [] if the_plan.checked else the_plan.checks:
        run_check(c, the_plan.check_shapes[c.src], read)
    out = {}
    for dst, rules in the_plan.by_target.items():
        shape = the_plan.target_shapes[dst]
        if dtype is not None:
            dt = np.dtype(dtype)
        else:
            dts = {np.dtype(source_dtype(r.src)) for r in rules} if source_dtype else {np.dtype(np.float32)}
            dt = dts.pop() if len(dts) == 1 else np.dtype(np.float32)
        buf = np.empty(shape, dt)
        for r in rules:
            part = TRANSFORMS[r.transform](read(r.src, r.src_index))
            dst_index = r.dst_index if r.layer is None else (r.layer, *r.dst_index)
            buf[dst_index] = part.astype(dt, copy=False)
        out[dst] = place(dst, buf)
        del buf
    return out


def run_check(check: Check, shape: tuple[int, ...], read: Callable[[str, Index], np.ndarray], rows: int = 1024):
    """Raise ConversionError unless the checked tensor (of `shape`) holds what `check` says,
    compared exactly; `equals` checks go `rows` leading rows at a time (large tied embeddings)."""
    if check.value is not None:
        want = np.asarray(check.value(shape))
        if want.shape != tuple(shape) or not np.array_equal(read(check.src, ()), want):
            raise ConversionError(f"{check.src} does not hold the expected values ({check.why or 'a fixed buffer'})")
        return
    chunks = [()] if not shape else [(slice(i, min(i + rows, shape[0])),) for i in range(0, shape[0], rows)]
    for ix in chunks:
        if not np.array_equal(read(check.src, ix), read(check.equals, ix)):
            raise ConversionError(
                f"{check.src} differs from {check.equals}{f' at rows {ix[0].start}:{ix[0].stop}' if ix else ''}: "
                f"they should be one {check.why or 'tied'} tensor saved twice; the file is inconsistent"
            )


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten(v, path + "/"))
        else:
            flat[path] = v
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree
