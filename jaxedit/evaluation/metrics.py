"""The usual editing metrics: L1 to a target image, and CLIP similarities with a JAX CLIP model converted from the
published CLIP-L (`python -m checkpoints_convert clip-model`; `jaxedit.clip_folder`).

    scorer = ClipScorer.load("clip-vit-large-patch14-jax")
    scorer.image_similarity(edits, targets)   # CLIP-I [B]: cosine of the paired images' embeddings
    scorer.text_similarity(edits, texts)      # CLIP-T [B]: cosine of each image's and its text's embeddings
    l1(target, edit)                          # mean |a - b| in [0, 1] units

The similarities are plain cosines in [-1, 1], as the editing benchmarks (MagicBrush, Emu Edit) report CLIP-I and
CLIP-T: not multiplied by CLIP's logit scale (exp(logit_scale) = 100 for CLIP-L), not by 100, not clipped at 0
(CLIPScore's 2.5 * max(cos, 0) is not used). `logits` gives transformers' `logits_per_image` when that is wanted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxedit import clip_folder
from jaxedit.clip_folder import ClipFolder
from jaxedit.models.clip_vision import CLIPModel
from jaxedit.options import MAX_PROMPT_CHARS

Images = Sequence[np.ndarray | Image.Image]


def _uint8_rgb(img: np.ndarray | Image.Image, what: str) -> np.ndarray:
    a = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{what}: want a uint8 [H, W, 3] image, got {a.dtype} {a.shape}")
    return a


def l1(a: np.ndarray | Image.Image, b: np.ndarray | Image.Image) -> float:
    """Mean absolute difference of two uint8 [H, W, 3] images (or PIL images, taken as RGB) in [0, 1] units
    (|a - b| / 255 averaged over pixels and channels). If their sizes differ, `b` is resized to `a`'s (PIL
    bicubic) first: pass the reference (target) image as `a`."""
    a, b = _uint8_rgb(a, "l1: a"), _uint8_rgb(b, "l1: b")
    if a.shape != b.shape:
        b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BICUBIC))
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))) / 255.0)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@dataclasses.dataclass
class ClipScorer:
    """CLIP image and text embeddings and their similarities, jitted, `batch_size` at a time (the last batch
    padded: one compiled program per scorer). Embeddings are transformers' `get_image_features` /
    `get_text_features` (projected, not normalised); similarities normalise them."""

    folder: ClipFolder
    params: Any
    tokenizer: Any
    batch_size: int = 8
    _image: Callable = dataclasses.field(init=False, repr=False)
    _text: Callable = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        model = CLIPModel(self.folder.config)
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="image_features"))
        self._text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method="text_features"))

    @classmethod
    def load(cls, folder: str | Path, *, batch_size: int = 8) -> ClipScorer:
        """Open a converted CLIP folder (`jaxedit.clip_folder.read`: one-line errors naming a folder that is not
        one), its parameters read in float32 with their checksums verified, its tokenizer from tokenizer/."""
        from jaxedit.checkpoint import load_params

        f = clip_folder.read(folder)
        params = load_params(f.params, dtype=jnp.float32)
        return cls(f, params, clip_folder.load_tokenizer(f), batch_size)

    def _batched(self, fn: Callable, x: np.ndarray) -> np.ndarray:
        n, bs, out = len(x), self.batch_size, []
        for i in range(0, n, bs):
            chunk = x[i : i + bs]
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(fn(self.params, jnp.asarray(chunk)))[: bs - pad])
        return np.concatenate(out) if out else np.zeros((0, self.folder.config.projection_dim), np.float32)

    def pixels(self, images: Images) -> np.ndarray:
        """[B, h, w, 3] float32: the images preprocessed as CLIPImageProcessor does (`clip_folder.preprocess`)."""
        return clip_folder.preprocess(images, self.folder.image_processing)

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        """input_ids [B, max_position_embeddings]: padded to CLIP's 77 tokens, truncated (EOS kept; a text is cut
        to MAX_PROMPT_CHARS characters first). No attention mask is needed: the text tower is causal and pools at
        the EOS, so the padding after it changes nothing."""
        n = self.folder.config.text.max_position_embeddings
        texts = [t[:MAX_PROMPT_CHARS] for t in texts]
        ids = self.tokenizer(texts, padding="max_length", max_length=n, truncation=True, return_tensors="np")
        return np.asarray(ids["input_ids"], np.int32)

    def image_features(self, images: Images) -> np.ndarray:
        """[B, projection_dim] image embeddings (transformers' `get_image_features`)."""
        return self._batched(self._image, self.pixels(images))

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """[B, projection_dim] text embeddings (transformers' `get_text_features`)."""
        return self._batched(self._text, self.tokens(texts))

    def image_similarity(self, images_a: Images, images_b: Images) -> np.ndarray:
        """CLIP-I [B]: cosine of the embeddings of images_a[i] and images_b[i] (e.g. edit and target)."""
        if len(images_a) != len(images_b):
            raise ValueError(f"image_similarity: {len(images_a)} images against {len(images_b)}")
        a, b = self.image_features(images_a), self.image_features(images_b)
        return np.asarray(jnp.sum(_unit(a) * _unit(b), axis=-1))

    def text_similarity(self, images: Images, texts: Sequence[str]) -> np.ndarray:
        """CLIP-T [B]: cosine of the embeddings of images[i] and texts[i] (not scaled by logit_scale)."""
        if len(images) != len(texts):
            raise ValueError(f"text_similarity: {len(images)} images against {len(texts)} texts")
        a, b = self.image_features(images), self.text_features(texts)
        return np.asarray(jnp.sum(_unit(a) * _unit(b), axis=-1))

    def logits(self, images: Images, texts: Sequence[str]) -> np.ndarray:
        """[B_images, B_texts] exp(logit_scale) * cosine: transformers CLIPModel's `logits_per_image`."""
        a, b = _unit(self.image_features(images)), _unit(self.text_features(texts))
        return np.asarray(jnp.exp(self.params["logit_scale"]) * a @ b.T)
