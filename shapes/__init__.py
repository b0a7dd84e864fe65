"""The synthetic shapes-editing task the default model is trained on (not part of the library).

`shapes.task` draws scenes and edits and renders them, `shapes.judge` scores an output against its
target from pixels alone, `shapes.dataset` writes training files, `python -m shapes` is the command
line. Everything a caller needs is re-exported here: `shapes.sample("test", 3)`, `shapes.judge(out, tgt)`.
"""

from shapes.cli import main
from shapes.dataset import parse_edit_weights, png_bytes, select_indices, write_split
from shapes.judge import MAX_ABSENT_AREA, MIN_IOU, MIN_PRESENT_AREA, Verdict, judge, psnr, score_edit, segment
from shapes.task import (
    COLOURS,
    EDIT_TYPES,
    EDITS,
    KINDS,
    MAX_JITTER,
    POSITIONS,
    SIZES,
    SPLIT_SIZE,
    SPLITS,
    Background,
    Sample,
    Scene,
    Shape,
    edit_of,
    random_scene,
    random_source,
    render,
    sample,
    seed_for,
    shape_alpha,
    vocabulary,
)

__all__ = [
    "COLOURS", "EDITS", "EDIT_TYPES", "KINDS", "MAX_ABSENT_AREA", "MAX_JITTER", "MIN_IOU", "MIN_PRESENT_AREA",
    "POSITIONS", "SIZES", "SPLITS", "SPLIT_SIZE", "Background", "Sample", "Scene", "Shape", "Verdict", "edit_of",
    "judge", "main", "parse_edit_weights", "png_bytes", "psnr", "random_scene", "random_source", "render",
    "sample", "score_edit", "seed_for", "segment", "select_indices", "shape_alpha", "vocabulary", "write_split",
]  # fmt: skip
