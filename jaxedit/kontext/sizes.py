"""The image sizes FLUX.1 Kontext was trained on: an input image's size for the pipeline's auto-resize."""

from __future__ import annotations

from jaxedit.sampling import floor_size

# (width, height) pairs Kontext was trained on, around 1 MP.
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def preferred_kontext_size(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext resolution nearest in aspect ratio to width/height."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return floor_size(w, h)
