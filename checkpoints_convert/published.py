"""The published checkpoints by tensor names and shapes: package data `checkpoints_convert/manifests/*.json`.

Each manifest lists every tensor (name, PyTorch shape) of one real release, read from its reference
module tree: FLUX.1 Kontext [dev] (BFL and diffusers layouts), the FLUX VAE, Step1X-Edit, T5-XXL,
CLIP-L, Qwen2.5-VL-7B. They let the converter be checked against the full-size models without the
weights (`plan_part` on a `ShapeSource`), and let `python -m checkpoints_convert check FILE` say
whether a file on disk has the tensors of a published release.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from importlib import resources


@dataclasses.dataclass(frozen=True)
class Published:
    """A published checkpoint: which model part, in which source layout, for which presets."""

    name: str  # manifest file stem
    part: str  # transformer | vae | t5 | clip | qwen
    fmt: str  # the converter's layout name
    presets: tuple[str, ...]


def published() -> dict[str, Published]:
    """Every published checkpoint by manifest name, as the families' converters list them (a checkpoint several
    families use, e.g. the FLUX VAE, lists the presets of each)."""
    from checkpoints_convert import family

    out: dict[str, Published] = {}
    for p in (p for c in family.all_converters() for p in c.published):
        seen = out.get(p.name)
        if seen is not None and (seen.part, seen.fmt) != (p.part, p.fmt):
            raise ValueError(f"published checkpoint {p.name} is listed as two parts or layouts")
        out[p.name] = p if seen is None else dataclasses.replace(seen, presets=seen.presets + p.presets)
    return out


def read_manifest(name: str) -> dict:
    """The whole manifest `name` (file stem, e.g. "bfl-ae"): format, file, model, note, tensors, ..."""
    if name not in published():
        raise KeyError(f"no published manifest {name!r}; known: {', '.join(sorted(published()))}")
    return json.loads(resources.files(__package__).joinpath("manifests", f"{name}.json").read_text())


def manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the published checkpoint `name`."""
    return {k: tuple(v) for k, v in read_manifest(name)["tensors"].items()}


def candidates(part: str, fmt: str | None = None, preset: str | None = None) -> list[Published]:
    """Published checkpoints of `part` (in layout `fmt`, for `preset`, when given)."""
    return [
        p
        for p in published().values()
        if p.part == part and (fmt is None or p.fmt == fmt) and (preset is None or preset in p.presets)
    ]


@dataclasses.dataclass(frozen=True)
class Difference:
    """How a checkpoint's tensors differ from a published one's (all empty: the same names and shapes)."""

    missing: tuple[str, ...]  # in the published checkpoint, not in this one
    extra: tuple[str, ...]  # in this one only
    reshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (name, this shape, published shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.reshaped)

    def describe(self, limit: int = 5) -> str:
        def some(items):
            return ", ".join(map(str, items[:limit])) + (
                f" (and {len(items) - limit} more)" if len(items) > limit else ""
            )

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {some(self.missing)}")
        if self.extra:
            parts.append(f"{len(self.extra)} extra: {some(self.extra)}")
        if self.reshaped:
            shapes = [f"{n} {a} (published {b})" for n, a, b in self.reshaped]
            parts.append(f"{len(self.reshaped)} of other shape: {some(shapes)}")
        return "; ".join(parts) or "same tensor names and shapes"


def compare(shapes: Mapping[str, tuple[int, ...]], name: str) -> Difference:
    """Compare a checkpoint's {name: shape} with the published checkpoint `name`."""
    ref = manifest_shapes(name)
    mine = {k: tuple(v) for k, v in shapes.items()}
    return Difference(
        missing=tuple(sorted(set(ref) - set(mine))),
        extra=tuple(sorted(set(mine) - set(ref))),
        reshaped=tuple(sorted((k, mine[k], ref[k]) for k in set(ref) & set(mine) if mine[k] != ref[k])),
    )
