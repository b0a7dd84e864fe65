"""A synthetic instruction-editing task: coloured shapes on a 3x3 grid, rendered with Pillow.

A scene is a low-saturation background (plain or a two-colour linear gradient) and 1..3
shapes; within a scene every shape has its own kind, palette colour and grid cell, so
an instruction can name a shape by its kind and a judge can find it by its colour.

    sample("train", 7)  -> Sample(source [64, 64, 3] uint8, target [64, 64, 3] uint8, instruction, edit, ...)

Six edits, drawn uniformly; the source scene is drawn so the edit's preconditions hold:
    recolour  "make the <colour> <shape> <newcolour>"   new colour not in the scene
    remove    "remove the <shape>"                       source has >= 2 shapes
    add       "add a <colour> <shape> at the <position>" new kind and colour, empty cell;
                                                         added shapes are large, unjittered
    move      "move the <shape> to the <position>"       empty cell; size and jitter kept
    bigger    "make the <shape> bigger"                  small -> large, same centre
    smaller   "make the <shape> smaller"                 large -> small, same centre
Everything else (background, other shapes) is identical in the target.

`sample(split, index)` is a pure function of (split, index): `numpy.random.default_rng`
seeded with the split's base + index (train 0, validation 10M, test 20M; 10M per split).

The judge is `shapes.judge`, the dataset files `shapes.dataset`, the command line `python -m shapes`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]

COLOURS: dict[str, Colour] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
KINDS = ("circle", "square", "triangle", "star")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
EDIT_TYPES = ("recolour", "remove", "add", "move", "bigger", "smaller")
SIZES = {"small": 0.26, "large": 0.43}  # radius / cell side; area ratio (0.43/0.26)^2 = 2.7, IoU 0.37
MAX_JITTER = 0.06  # centre offset / cell side; 0.43 + 0.06 < 0.5 keeps every shape inside its cell
_COLOUR_NAMES, _SIZE_NAMES = tuple(COLOURS), tuple(SIZES)
SPLITS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
SPLIT_SIZE = 10_000_000
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down


@dataclasses.dataclass(frozen=True)
class Background:
    kind: str  # "plain" | "horizontal" (a at left -> b at right) | "vertical" (a at top -> b at bottom)
    a: Colour
    b: Colour


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # a key of COLOURS
    cell: int  # index into POSITIONS: row * 3 + column
    size: str  # "small" | "large"
    dx: float = 0.0  # centre offset in cell sides, |dx| <= MAX_JITTER
    dy: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scene:
    background: Background
    shapes: tuple[Shape, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (colours as lists); `Scene.from_dict` inverts it."""
        bg = self.background
        return {
            "background": {"kind": bg.kind, "a": list(bg.a), "b": list(bg.b)},
            "shapes": [dict(vars(s)) for s in self.shapes],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        bg = d["background"]
        return cls(
            Background(bg["kind"], tuple(bg["a"]), tuple(bg["b"])),
            tuple(Shape(**s) for s in d["shapes"]),
        )

    def replace(self, old: Shape, new: Shape | None) -> Scene:
        """The scene with `old` replaced by `new` (in place, keeping draw order) or removed."""
        shapes = tuple(new if s == old else s for s in self.shapes)
        return dataclasses.replace(self, shapes=tuple(s for s in shapes if s is not None))


@dataclasses.dataclass(frozen=True)
class Sample:
    source: np.ndarray  # [H, W, 3] uint8
    target: np.ndarray  # [H, W, 3] uint8
    instruction: str
    edit: str
    source_scene: dict[str, Any]
    target_scene: dict[str, Any]
    split: str
    index: int


# ----------------------------------------------------------------------------- scenes


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    if not options:
        raise ValueError("edit precondition does not hold for this scene")
    return options[int(rng.integers(len(options)))]


def _grey(rng: np.random.Generator) -> Colour:
    level = int(rng.integers(40, 231))
    return tuple(int(level + o) for o in rng.integers(-14, 15, 3))  # channel spread <= 28


def random_background(rng: np.random.Generator) -> Background:
    kind = _pick(rng, ("plain", "horizontal", "vertical"))
    a = _grey(rng)
    return Background(kind, a, a if kind == "plain" else _grey(rng))


def _jitter(rng: np.random.Generator) -> tuple[float, float]:
    dx, dy = rng.uniform(-MAX_JITTER, MAX_JITTER, 2)
    return round(float(dx), 4), round(float(dy), 4)


def random_scene(rng: np.random.Generator, n_shapes: int) -> Scene:
    """A background and `n_shapes` shapes of distinct kinds, colours and cells."""
    kinds = rng.permutation(len(KINDS))[:n_shapes]
    colours = rng.permutation(len(COLOURS))[:n_shapes]
    cells = rng.permutation(len(POSITIONS))[:n_shapes]
    shapes = tuple(
        Shape(KINDS[k], _COLOUR_NAMES[c], int(p), _pick(rng, _SIZE_NAMES), *_jitter(rng))
        for k, c, p in zip(kinds, colours, cells)
    )
    return Scene(random_background(rng), shapes)


# ----------------------------------------------------------------------------- edits


def edit_recolour(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
    s = _pick(rng, scene.shapes)
    new = _pick(rng, [c for c in COLOURS if c not in {t.colour for t in scene.shapes}])
    return f"make the {s.colour} {s.kind} {new}", scene.replace(s, dataclasses.replace(s, colour=new))


def edit_remove(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
    s = _pick(rng, scene.shapes if len(scene.shapes) >= 2 else [])
    return f"remove the {s.kind}", scene.replace(s, None)


def edit_add(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
    kind = _pick(rng, [k for k in KINDS if k not in {s.kind for s in scene.shapes}])
    colour = _pick(rng, [c for c in COLOURS if c not in {s.colour for s in scene.shapes}])
    cell = _pick(rng, [p for p in range(len(POSITIONS)) if p not in {s.cell for s in scene.shapes}])
    new = Shape(kind, colour, cell, "large")
    return f"add a {colour} {kind} at the {POSITIONS[cell]}", dataclasses.replace(scene, shapes=scene.shapes + (new,))


def edit_move(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
    s = _pick(rng, scene.shapes)
    cell = _pick(rng, [p for p in range(len(POSITIONS)) if p not in {t.cell for t in scene.shapes}])
    return f"move the {s.kind} to the {POSITIONS[cell]}", scene.replace(s, dataclasses.replace(s, cell=cell))


def edit_bigger(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
    s = _pick(rng, [t for t in scene.shapes if t.size == "small"])
    return f"make the {s.kind} bigger", scene.replace(s, dataclasses.replace(s, size="large"))


def edit_smaller(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
    s = _pick(rng, [t for t in scene.shapes if t.size == "large"])
    return f"make the {s.kind} smaller", scene.replace(s, dataclasses.replace(s, size="small"))


EDITS: dict[str, Callable[[Scene, np.random.Generator], tuple[str, Scene]]] = {
    "recolour": edit_recolour,
    "remove": edit_remove,
    "add": edit_add,
    "move": edit_move,
    "bigger": edit_bigger,
    "smaller": edit_smaller,
}
_N_SHAPES = {"remove": (2, 3), "add": (1, 2)}  # (min, max) source shapes; default (1, 3)


def random_source(edit: str, rng: np.random.Generator) -> Scene:
    """A random scene on which `edit` can be applied."""
    lo, hi = _N_SHAPES.get(edit, (1, 3))
    scene = random_scene(rng, int(rng.integers(lo, hi + 1)))
    if edit in ("bigger", "smaller"):  # make sure one shape has the size the edit starts from
        s = _pick(rng, scene.shapes)
        scene = scene.replace(s, dataclasses.replace(s, size="small" if edit == "bigger" else "large"))
    return scene


# ----------------------------------------------------------------------------- rendering


_RGB = {name: np.asarray(rgb, np.float32) for name, rgb in COLOURS.items()}


def _background(bg: Background, size: int) -> np.ndarray:
    """[size, size, 3] float32."""
    a, b = np.asarray(bg.a, np.float32), np.asarray(bg.b, np.float32)
    if bg.kind == "plain":
        return np.broadcast_to(a, (size, size, 3)).copy()
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    ramp = a + t[:, None] * (b - a)  # [size, 3]
    return np.broadcast_to(ramp[None] if bg.kind == "horizontal" else ramp[:, None], (size, size, 3)).copy()


def _outline(shape: Shape, size: int) -> tuple[str, list[tuple[float, float]], tuple[float, float, float]]:
    """("ellipse", bbox) or ("polygon", points), in pixels, and (centre x, centre y, radius)."""
    cell = size / 3
    row, col = divmod(shape.cell, 3)
    cx, cy = (col + 0.5 + shape.dx) * cell, (row + 0.5 + shape.dy) * cell
    r = SIZES[shape.size] * cell
    if shape.kind == "circle":
        return "ellipse", [(cx - r, cy - r), (cx + r, cy + r)], (cx, cy, r)
    if shape.kind == "square":
        h = 0.85 * r  # about the circle's area
        return "polygon", [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], (cx, cy, r)
    if shape.kind == "triangle":  # pointing up, circumradius r
        n, radii = 3, [r]
    elif shape.kind == "star":  # five points, inner radius r / 2
        n, radii = 10, [r, 0.5 * r]
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")
    points = []
    for i in range(n):
        t, rad = -math.pi / 2 + 2 * math.pi * i / n, radii[i % len(radii)]
        points.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
    return "polygon", points, (cx, cy, r)


@functools.lru_cache(maxsize=64)  # source and target share most shapes
def shape_alpha(shape: Shape, size: int) -> tuple[np.ndarray, int, int]:
    """(coverage [h, w] float32 in [0, 1], x0, y0): the shape's antialiased mask over its bounding box.

    Drawn at SUPERSAMPLE x and box-filtered down; the box is the shape's circle, rounded out.
    """
    how, xy, (cx, cy, r) = _outline(shape, size)
    x0, y0 = max(0, math.floor(cx - r)), max(0, math.floor(cy - r))
    x1, y1 = min(size, math.ceil(cx + r) + 1), min(size, math.ceil(cy + r) + 1)
    k = SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
    xy = [((x - x0) * k, (y - y0) * k) for x, y in xy]
    if how == "ellipse":  # PIL's bbox includes its last pixel
        (a, b), (c, d) = xy
        ImageDraw.Draw(mask).ellipse([(a, b), (c - 1, d - 1)], fill=255)
    else:
        ImageDraw.Draw(mask).polygon(xy, fill=255)
    alpha = np.asarray(mask.reduce(k), np.float32) / 255.0
    alpha.flags.writeable = False
    return alpha, x0, y0


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a [size, size, 3] uint8 image; shapes antialiased (drawn at 4x, box-filtered)."""
    out = _background(scene.background, size)
    for shape in scene.shapes:
        alpha, x0, y0 = shape_alpha(shape, size)
        h, w = alpha.shape
        region = out[y0 : y0 + h, x0 : x0 + w]
        region += alpha[..., None] * (_RGB[shape.colour] - region)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- samples


def seed_for(split: str, index: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index {index} of split {split!r} is outside [0, {SPLIT_SIZE})")
    return SPLITS[split] + index


def _draw_edit(rng: np.random.Generator) -> str:
    return EDIT_TYPES[int(rng.integers(len(EDIT_TYPES)))]


def edit_of(split: str, index: int) -> str:
    """`sample(split, index).edit` without building the scene (the edit is the seed's first draw)."""
    return _draw_edit(np.random.default_rng(seed_for(split, index)))


def sample(split: str, index: int, size: int = 64) -> Sample:
    """Edit pair number `index` of `split`; a pure function of (split, index) (and `size`)."""
    rng = np.random.default_rng(seed_for(split, index))
    edit = _draw_edit(rng)
    source = random_source(edit, rng)
    instruction, target = EDITS[edit](source, rng)
    return Sample(
        render(source, size), render(target, size), instruction, edit, source.to_dict(), target.to_dict(), split, index
    )


def vocabulary() -> list[str]:
    """Every instruction the task can produce (all templates, all fillers): tokenizer training text."""
    out = [f"remove the {k}" for k in KINDS]
    out += [f"make the {k} {w}" for k in KINDS for w in ("bigger", "smaller")]
    out += [f"move the {k} to the {p}" for k in KINDS for p in POSITIONS]
    out += [f"add a {c} {k} at the {p}" for c in COLOURS for k in KINDS for p in POSITIONS]
    out += [f"make the {c} {k} {n}" for c, n in itertools.permutations(COLOURS, 2) for k in KINDS]
    return out
