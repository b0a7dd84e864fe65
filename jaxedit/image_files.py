"""Images as they are displayed: a photo's EXIF orientation applied wherever an image file is read (edit,
batch, references, training, precompute), as diffusers' `load_image` does (`ImageOps.exif_transpose`), so a
photo shown 64x128 is edited as 64x128, not sideways. The orientation is read from the header only (no pixel
decoded; a PNG's eXIf chunk after its pixels is not seen), so the size found before decoding is the size
decoded."""

from __future__ import annotations

from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag; 5-8 swap width and height
# orientation -> the transpose that shows the image upright (as PIL's ImageOps.exif_transpose)
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1: as stored), from what its header holds (nothing decoded)."""
    try:
        if im.format == "PNG":  # (PIL's PNG getexif decodes the image to look past the pixels)
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = int(exif.get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: shown as stored
        return 1
    return value if value in TRANSPOSE else 1


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) the image is displayed at (its EXIF orientation applied), from its header."""
    w, h = im.size
    return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)


def upright(im: Image.Image, turn: int | None = None) -> Image.Image:
    """The image turned as its EXIF orientation (or `turn`, read before decoding) says; itself if unturned."""
    turn = orientation(im) if turn is None else turn
    return im.transpose(TRANSPOSE[turn]) if turn in TRANSPOSE else im
