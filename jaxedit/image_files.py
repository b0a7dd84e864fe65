"""Images as they are displayed: a photo's EXIF orientation applied wherever an image file is read (edit,
batch, references, training, precompute), as diffusers' `load_image` does (`ImageOps.exif_transpose`), so a
photo shown 64x128 is edited as 64x128, not sideways."""

from __future__ import annotations

from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag; 5-8 swap width and height


def orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1: as stored), read from its header (nothing decoded)."""
    try:
        value = int(im.getexif().get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: shown as stored, as PIL's exif_transpose does
        return 1
    return value if 1 <= value <= 8 else 1


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) the image is displayed at (its EXIF orientation applied), from its header."""
    w, h = im.size
    return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)


def upright(im: Image.Image) -> Image.Image:
    """The decoded image turned as its EXIF orientation says (itself if it says nothing)."""
    return ImageOps.exif_transpose(im) if orientation(im) != 1 else im
