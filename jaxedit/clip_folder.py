"""A converted CLIP model folder (what `python -m checkpoints_convert clip-model SRC DST` writes from a transformers
CLIPModel folder such as openai/clip-vit-large-patch14), read once into one validated value, and CLIP's image
preprocessing (transformers' CLIPImageProcessor, PIL backend) in numpy / PIL.

    FOLDER/clip.json     {"format": "jaxedit-clip-model", "version": 1, "config": {...}, "image_processor": {...}}
    FOLDER/params/       the `jaxedit.models.clip_vision.CLIPModel` parameters (sealed Orbax checkpoint)
    FOLDER/tokenizer/    the source folder's tokenizer files, as they were
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from jaxedit.models.clip_vision import CLIPModelConfig

FORMAT, VERSION = "jaxedit-clip-model", 1
DESCRIPTION, PARAMS, TOKENIZER = "clip.json", "params", "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """CLIPImageProcessor's settings: resize the shortest side to `shortest_edge` (the other side
    int(shortest_edge * long / short)) with PIL `resample` (3: bicubic), center-crop to `crop` (height, width),
    multiply by `rescale_factor`, normalise with `mean` / `std` per channel."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)
    resample: int = 3
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_hf(cls, d: dict, where: str = "preprocessor_config.json") -> ImageProcessing:
        """From a transformers preprocessor_config.json (a dict); ValueError naming `where` for settings other
        than CLIP's resize / center crop / rescale / normalise."""
        off = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if d.get(k, True) is False]
        if off or d.get("do_pad"):
            raise ValueError(f"{where}: {', '.join(off) or 'do_pad'}: only CLIP's standard preprocessing is supported")
        size, crop = d.get("size", 224), d.get("crop_size", 224)
        try:
            edge = size if isinstance(size, int) else size["shortest_edge"]
            crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        except (KeyError, TypeError):
            msg = f"size {size!r} / crop_size {crop!r}: want shortest_edge and height/width"
            raise ValueError(f"{where}: {msg}") from None
        return cls(int(edge), (int(crop[0]), int(crop[1])), int(d.get("resample", 3)),
                   float(d.get("rescale_factor", 1 / 255)), tuple(map(float, d.get("image_mean", OPENAI_CLIP_MEAN))),
                   tuple(map(float, d.get("image_std", OPENAI_CLIP_STD))))  # fmt: skip

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def resize_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after resizing the shortest side to `shortest_edge`, as transformers computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def preprocess(images: Sequence[np.ndarray | Image.Image], proc: ImageProcessing) -> np.ndarray:
    """Images (uint8 [H, W, 3] arrays or PIL images, converted to RGB) -> [B, crop_h, crop_w, 3] float32, as
    CLIPImageProcessor's `pixel_values` (which are [B, 3, h, w])."""
    out = []
    for img in images:
        pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))
        pil = pil.convert("RGB")
        h, w = resize_size(pil.height, pil.width, proc.shortest_edge)
        a = np.asarray(pil.resize((w, h), resample=proc.resample))
        ch, cw = proc.crop
        top, left = (h - ch) // 2, (w - cw) // 2
        if top < 0 or left < 0:
            raise ValueError(f"crop {proc.crop} is larger than the resized image ({h}, {w})")
        a = a[top : top + ch, left : left + cw]
        a = (a.astype(np.float64) * proc.rescale_factor).astype(np.float32)
        out.append((a - np.asarray(proc.mean, np.float32)) / np.asarray(proc.std, np.float32))
    return np.stack(out)


@dataclasses.dataclass(frozen=True)
class ClipFolder:
    """A converted CLIP model folder: where it is, its model config and image preprocessing."""

    path: Path
    config: CLIPModelConfig
    image_processing: ImageProcessing

    @property
    def params(self) -> Path:
        return self.path / PARAMS

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER


def load_tokenizer(folder: ClipFolder):
    """transformers' CLIPTokenizer from the folder's tokenizer/ (local files only; imported directly:
    AutoTokenizer would pull in torch)."""
    import os

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # (its notice that PyTorch is absent is noise)
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(str(folder.tokenizer), local_files_only=True)


def description(config: CLIPModelConfig, proc: ImageProcessing, source: str) -> dict:
    """The clip.json of a folder converted from `source`."""
    return {"format": FORMAT, "version": VERSION, "source": source, "config": config.to_json(),
            "image_processor": proc.to_json()}  # fmt: skip


def read(folder: str | Path) -> ClipFolder:
    """Open a converted CLIP model folder; FileNotFoundError / ValueError (one line) naming the folder or file
    when it is not one (e.g. a jaxedit editing-model folder or a transformers folder not yet converted)."""
    folder = Path(folder)
    desc = folder / DESCRIPTION
    if not desc.is_file():
        hint = " (a transformers CLIPModel folder: convert it with `python -m checkpoints_convert clip-model`)"
        raise FileNotFoundError(f"{folder} is not a converted CLIP model folder (no {DESCRIPTION})"
                                f"{hint if (folder / 'config.json').is_file() else ''}")  # fmt: skip
    try:
        d = json.loads(desc.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, not {FORMAT!r}")
        if d.get("version") != VERSION:
            raise ValueError(f"version {d.get('version')!r}; this jaxedit reads version {VERSION}")
        cfg = CLIPModelConfig.from_json(d["config"])
        p = d["image_processor"]
        proc = ImageProcessing(**{**p, "crop": tuple(p["crop"]), "mean": tuple(p["mean"]), "std": tuple(p["std"])})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{desc}: not a CLIP model description ({type(e).__name__}: {e})") from None
    for sub in (PARAMS, TOKENIZER):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder}: missing {sub}/ (an incomplete CLIP model folder)")
    return ClipFolder(folder, cfg, proc)
