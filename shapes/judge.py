"""The judge of the shapes task: does an output show the target's coloured shapes in the target's places?

It only looks at pixels: each pixel is background or the palette colour it is closest to, if it is
saturated and close enough (`segment`); an output passes when every colour of the target covers
the same place (IoU >= 0.5) and no other colour shows (`judge`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from shapes.task import COLOURS

# Judge thresholds (see `segment` and `judge`); pixel counts are for 64x64 and scale with area.
MIN_SATURATION = 60  # max - min channel; backgrounds have < 30
MAX_DISTANCE = 80  # RGB distance to the nearest palette colour
MIN_PRESENT_AREA = 8  # a colour with fewer pixels in the target counts as absent
MAX_ABSENT_AREA = 12  # an absent colour may show on at most this many output pixels
MIN_IOU = 0.5


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    details: dict[str, dict[str, Any]]  # colour -> {target_area, output_area, iou, ok}


# ----------------------------------------------------------------------------- judge


_PALETTE = np.asarray(list(COLOURS.values()), np.int32)  # [6, 3]
_PALETTE_HUE = (_PALETTE - _PALETTE.min(1, keepdims=True)) / np.ptp(_PALETTE, 1, keepdims=True)  # [6, 3]


def _scale(shape: tuple[int, ...]) -> float:
    return shape[0] * shape[1] / (64 * 64)


def segment(image: Image.Image | np.ndarray) -> np.ndarray:
    """[H, W] int: 0 for background, i + 1 for pixels of palette colour i (list(COLOURS)[i]).

    A pixel is a shape pixel when it is saturated (max - min channel > MIN_SATURATION) and
    within MAX_DISTANCE (RGB) of some palette colour. Its label is the palette colour of
    nearest hue, compared as chroma (rgb - min) / (max - min): blending a colour with a grey
    background keeps that ratio, so antialiased edges (a blue edge on light grey is nearer
    purple in RGB; a yellow edge on dark grey nearer orange) keep their shape's colour.
    """
    x = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)[..., :3]
    lo, hi = x.min(-1), x.max(-1)
    out = np.zeros(x.shape[:2], np.int64)
    ys, xs = np.nonzero(hi.astype(np.int32) - lo > MIN_SATURATION)  # only saturated pixels need a look
    if len(ys):
        px = x[ys, xs].astype(np.float32)  # [N, 3]
        close = ((px[:, None] - _PALETTE) ** 2).sum(-1).min(-1) < MAX_DISTANCE**2
        lo_, hi_ = lo[ys, xs, None].astype(np.float32), hi[ys, xs, None].astype(np.float32)
        hue = (px - lo_) / (hi_ - lo_)  # [N, 3]
        nearest = ((hue[:, None] - _PALETTE_HUE) ** 2).sum(-1).argmin(-1)
        out[ys, xs] = np.where(close, nearest + 1, 0)
    return out


def judge(output: Image.Image | np.ndarray, target: Image.Image | np.ndarray) -> Verdict:
    """Does `output` show the same coloured shapes, in the same places, as `target`?

    Every colour present in the target (>= MIN_PRESENT_AREA px) needs IoU >= MIN_IOU between
    the output's and the target's masks; every other colour may cover <= MAX_ABSENT_AREA output
    pixels. Pixel counts are for 64x64 images and scale with the image area.
    """
    seg_t, seg_o = segment(target), segment(output)
    if seg_t.shape != seg_o.shape:
        raise ValueError(f"output size {seg_o.shape[::-1]} differs from target size {seg_t.shape[::-1]}")
    scale = _scale(seg_t.shape)
    details = {}
    for i, name in enumerate(COLOURS, start=1):
        t, o = seg_t == i, seg_o == i
        ta, oa = int(t.sum()), int(o.sum())
        if ta >= MIN_PRESENT_AREA * scale:
            iou = float((t & o).sum() / (t | o).sum())
            details[name] = {"target_area": ta, "output_area": oa, "iou": iou, "ok": iou >= MIN_IOU}
        else:
            details[name] = {"target_area": ta, "output_area": oa, "iou": None, "ok": oa <= MAX_ABSENT_AREA * scale}
    return Verdict(all(d["ok"] for d in details.values()), details)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 [H, W, 3] images (benchmarks/demo_quality.py's)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def score_edit(edited: np.ndarray, *, source: np.ndarray, target: np.ndarray, **_) -> dict[str, Any]:
    """`jaxedit eval --judge shapes:score_edit`: the judge's verdict (ok) and PSNR of the edit and of the source
    (the do-nothing baseline) against the target, on uint8 [H, W, 3] arrays."""
    if target is None:
        raise ValueError("the shapes judge needs each item's target image")
    return {"ok": judge(edited, target).ok, "psnr": psnr(edited, target), "psnr_source": psnr(source, target)}
