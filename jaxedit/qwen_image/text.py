"""Qwen-Image-Edit text conditioning: Qwen2.5-VL-7B last hidden states of (instruction, 1-3 reference images).

Follows diffusers' `QwenImageEditPlusPipeline` (2509, 2511; `encode_prompt` / `_get_qwen_prompt_embeds`):

1. Each reference is resized to about 384 x 384 px at its aspect ratio, sides multiples of 32
   (`calculate_dimensions`, `condition_image`: PIL Lanczos, as diffusers' `VaeImageProcessor.resize`); the
   Qwen2-VL image processor then resizes it again to multiples of 28 within its [min_pixels, max_pixels].
2. The text is `template.format(images + instruction)`: the system prompt (the fixed chat of the pipeline, no
   chat template is rendered), then per image "Picture i: <|vision_start|><|image_pad|><|vision_end|>", the
   instruction and the assistant turn; each image's pad becomes one token per merged 2x2 patch.
3. The output is the last hidden state of the tokens (attention mask all ones, 3-D multimodal rope positions);
   the first 64 (the system prompt) are dropped; the items of a batch are zero-padded to the longest, mask 1 on
   kept tokens.

The first Qwen-Image-Edit (diffusers' `QwenImageEditPipeline`) differs in two settings, both config fields:
one image without the "Picture 1: " prefix, resized to about 1024 x 1024 px (`SINGLE_IMAGE`).

diffusers does not bound the length here (`max_sequence_length` is only checked <= 1024); ours truncates the kept
rows to `max_sequence_length` (as its text-to-image pipeline does) and logs it.

Known difference: diffusers >= 0.38 with transformers >= 5 does not pass `mm_token_type_ids` to the text encoder,
which then silently uses 1-D text positions for every token (diffusers issue #14194, PR #14189). Ours uses the
3-D positions the model was trained with (transformers 4); the parity test passes them to diffusers' encoder.

The model is the JAX Qwen2.5-VL (`jaxedit.qwen_vl.QwenVLEncoder`, no torch): several items at once, each with its
own images, padded to shape buckets, one jitted program per bucket, on one device or a mesh. A model folder holds
the converted weights in qwen/ and, in qwen_processor/, the files of the release's processor/ (with tokenizer/'s):
tokenizer_config.json, vocab.json, merges.txt (tokenizer.json, added_tokens.json, special_tokens_map.json when
present) and preprocessor_config.json (the image processor: patch 14, merge 2, min/max pixels); its chat template
is not used (`load_qwen_image_embedder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxedit import qwen_vl
from jaxedit.model_folder import ModelFolder
from jaxedit.qwen_vl import QWEN_PROCESSOR, QwenSection, load_embedding, save_embedding

log = logging.getLogger(__name__)

TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
VISION = VISION_START + IMAGE_PAD + VISION_END


@dataclasses.dataclass(frozen=True)
class QwenImageTextConfig:
    """Qwen-Image-Edit's conditioning (defaults: `QwenImageEditPlusPipeline`, the 2509 and 2511 releases)."""

    template: str = TEMPLATE  # the chat, "{}": the images' and the instruction's text
    drop_tokens: int = 64  # leading tokens dropped (the system prompt; diffusers' prompt_template_encode_start_idx)
    picture_prefixes: bool = True  # "Picture i: " before each image's vision tokens (False: the vision tokens alone)
    condition_area: int = 384 * 384  # each reference resized to about this many pixels (`calculate_dimensions`)
    max_sequence_length: int = 1024  # kept tokens (after the drop) at most
    max_images: int = 3  # reference images an item may have

    @classmethod
    def from_dict(cls, d: dict) -> QwenImageTextConfig:
        return qwen_vl.config_from_dict(cls, d, "Qwen-Image text")

    def __post_init__(self):
        if self.template.count("{}") != 1:
            raise ValueError("the template takes the images' and the instruction's text at its one '{}'")
        if self.drop_tokens < 0 or self.max_sequence_length < 1 or self.max_images < 1 or self.condition_area < 1:
            raise ValueError(f"bad Qwen-Image text config {self}")

    def text(self, prompt: str, images: int) -> str:
        """The chat of one item: the template around each image's vision tokens and the instruction."""
        vision = "".join(f"Picture {i + 1}: {VISION}" if self.picture_prefixes else VISION for i in range(images))
        return self.template.format(vision + prompt)


PLUS = QwenImageTextConfig()  # QwenImageEditPlusPipeline: Qwen-Image-Edit-2509, -2511
SINGLE_IMAGE = QwenImageTextConfig(picture_prefixes=False, condition_area=1024 * 1024, max_images=1)  # QwenImageEdit


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `target_area` pixels at aspect `ratio` (w / h), sides multiples of 32 (diffusers'
    `calculate_dimensions`; Python's round: halves to even)."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def condition_image(image: Image.Image, area: int = PLUS.condition_area) -> Image.Image:
    """A reference as Qwen2.5-VL sees it (before the image processor): resized to `calculate_dimensions(area,
    w / h)` with PIL's Lanczos (diffusers' `VaeImageProcessor.resize`; its mode kept, the processor makes it RGB)."""
    w, h = calculate_dimensions(area, image.width / image.height)
    if w < 1 or h < 1:
        raise ValueError(f"image {image.width}x{image.height} is too narrow for {area} px at sides of 32")
    return image.resize((w, h), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def qwen_entry(path: str | Path | None, config: QwenImageTextConfig | None = None, model=None) -> dict:
    """The "qwen" entry of a Qwen-Image-Edit model folder's description: a transformers Qwen2.5-VL folder (None:
    none), the `QwenImageTextConfig` (None: the default) and the architecture (a `QwenVLConfig`) of the Qwen2.5-VL
    converted into the folder's qwen/ (None: none); the shape Step1X-Edit's has (`jaxedit.qwen_vl.qwen_entry`)."""
    return qwen_vl.qwen_entry(path, config or QwenImageTextConfig(), model)


def qwen_section(folder: ModelFolder) -> QwenSection:
    """The "qwen" entry of an opened Qwen-Image-Edit model folder (its config a `QwenImageTextConfig`)."""
    return qwen_vl.read_qwen_section(folder, QwenImageTextConfig.from_dict)


ItemImages = Sequence[Image.Image] | Image.Image


class QwenImageEmbedder:
    """Qwen-Image-Edit's conditioning on the JAX Qwen2.5-VL: `encode(prompts, images)` -> (embeddings [B, L, D]
    float32, mask [B, L] int32), L the longest item's kept tokens.

    encoder: a `jaxedit.qwen_vl.QwenVLEncoder` (its batch_size items per run); tokenizer, image_processor: the
    Qwen2.5-VL tokenizer and Qwen2-VL image processor (PIL backend) of the release's processor/."""

    def __init__(self, encoder, tokenizer, image_processor, config: QwenImageTextConfig = PLUS, *, name=""):
        self.encoder, self.tokenizer, self.image_processor = encoder, tokenizer, image_processor
        self.config, self.merge_size = config, image_processor.merge_size
        self.name = f"{name} ({encoder.dtype.name})"  # the cache key: a bfloat16 run is another result
        qcfg = encoder.qwen_cfg
        ids = (qcfg.vision_start_token_id, qcfg.image_token_id, qcfg.vision_end_token_id)
        for token, want in zip((VISION_START, IMAGE_PAD, VISION_END), ids):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != want:
                raise ValueError(f"the tokenizer's {token} is id {got}, the Qwen2.5-VL's {want}")

    @staticmethod
    def load_processor(path: str | Path):
        """(tokenizer, image processor) of a folder: a model folder's qwen_processor/ (a release's processor/)."""
        path = Path(path)
        for f in ("tokenizer_config.json", "preprocessor_config.json"):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path}: no {f} (the Qwen2.5-VL tokenizer / image processor files)")
        return qwen_vl.load_tokenizer(path), qwen_vl.load_image_processor(path)

    # ------------------------------------------------------------------------------------

    def condition_images(self, images: ItemImages) -> list[Image.Image]:
        """One item's references resized for Qwen2.5-VL (`condition_image` at the config's area)."""
        return [condition_image(im, self.config.condition_area) for im in self.item_images(images)]

    def item_images(self, images: ItemImages) -> list[Image.Image]:
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not 1 <= len(images) <= self.config.max_images:
            raise ValueError(f"an item takes 1 to {self.config.max_images} reference images, got {len(images)}")
        return images

    def prepare_inputs(self, prompt: str, images: ItemImages) -> dict[str, Any]:
        """Model inputs of one item whose images are resized already (`condition_images`), as diffusers' processor
        call gives them (numpy): input_ids [L] int64, attention_mask [L] (ones), pixel_values [N, patch_dim],
        image_grid_thw [n_images, 3]."""
        images = self.item_images(images)
        vision = self.image_processor(images=images, return_tensors="np")
        grids = np.asarray(vision["image_grid_thw"], np.int64)
        pieces = self.config.text(prompt, len(images)).split(IMAGE_PAD)
        if len(pieces) != len(images) + 1:
            raise ValueError(f"the prompt holds {IMAGE_PAD} itself: {len(pieces) - 1} image pads for {len(images)}")
        text = pieces[0]
        for grid, piece in zip(grids, pieces[1:]):
            text += IMAGE_PAD * (int(grid.prod()) // self.merge_size**2) + piece
        input_ids = np.asarray(self.tokenizer(text)["input_ids"], np.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": np.ones(len(input_ids), np.int32),
            "pixel_values": np.asarray(vision["pixel_values"], np.float32),
            "image_grid_thw": grids,
        }

    def keep(self, hidden_LD: np.ndarray) -> np.ndarray:
        """The rows of one item's last hidden state that condition: after `drop_tokens`, at most
        `max_sequence_length`."""
        cfg = self.config
        rows = hidden_LD[cfg.drop_tokens :]
        if len(rows) == 0:
            raise ValueError(f"{len(hidden_LD)} tokens, not more than drop_tokens={cfg.drop_tokens}")
        if len(rows) > cfg.max_sequence_length:
            log.warning("prompt of %d tokens truncated to max_sequence_length=%d", len(rows), cfg.max_sequence_length)
        return np.asarray(rows[: cfg.max_sequence_length], np.float32)

    def embed_items(self, items: Sequence[tuple[str, list[Image.Image]]]) -> list[np.ndarray]:
        """Each (prompt, condition images)'s kept rows [n_i, D] float32, `encoder.batch_size` items per run."""
        out, size = [], self.encoder.batch_size
        for start in range(0, len(items), size):
            chunk = [self.prepare_inputs(p, ims) for p, ims in items[start : start + size]]
            out += [self.keep(h) for h in self.encoder.last_hidden_states(chunk)]
        return out

    def cache_key(self, prompt: str, images: Sequence[Image.Image]) -> str:
        """A file name for one item's output: hash of model name, config, prompt and condition images' pixels."""
        h = hashlib.sha256(json.dumps([self.name, dataclasses.asdict(self.config), prompt]).encode())
        for im in images:
            h.update(json.dumps([im.mode, im.size]).encode())
            h.update(im.tobytes())
        return h.hexdigest()[:32]

    def encode(
        self,
        prompts: Sequence[str] | str,
        images: Sequence[ItemImages],
        *,
        resize: bool = True,
        cache_dir: str | Path | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items (prompt_i, [reference images of item i]) -> (embeddings [B, L, D] float32, mask [B, L] int32): each
        item's kept rows, zero-padded to the batch's longest L (mask 1 on kept rows), as diffusers' `encode_prompt`
        of each item alone, padded as its batches are.

        resize: resize the references for Qwen2.5-VL (`condition_images`; False: they are, as diffusers'
        `encode_prompt` takes them). cache_dir: read each item from `<cache_dir>/<cache_key>.npz` when present, else
        compute it (the missing ones together) and write it there."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} items of images")
        if not prompts:
            raise ValueError("no items to encode")
        conditions = [self.condition_images(ims) if resize else self.item_images(ims) for ims in images]
        paths = [Path(cache_dir) / f"{self.cache_key(p, c)}.npz" if cache_dir else None
                 for p, c in zip(prompts, conditions)]  # fmt: skip
        out: list[Any] = [load_embedding(p)[0] if p is not None and p.is_file() else None for p in paths]
        todo = [i for i, o in enumerate(out) if o is None]
        for i, rows in zip(todo, self.embed_items([(prompts[i], conditions[i]) for i in todo]) if todo else []):
            if paths[i] is not None:
                save_embedding(paths[i], rows, np.ones(len(rows), np.int32))
            out[i] = rows
        length = max(len(r) for r in out)
        emb = np.zeros((len(out), length, self.encoder.hidden_size), np.float32)
        mask = np.zeros((len(out), length), np.int32)
        for i, rows in enumerate(out):
            emb[i, : len(rows)], mask[i, : len(rows)] = rows, 1
        return emb, mask

    __call__ = encode


def load_qwen_image_embedder(
    folder: str | Path | ModelFolder,
    *,
    dtype: str = "bfloat16",
    mesh=None,
    config: QwenImageTextConfig | None = None,
    attention_impl: str = "auto",
    batch_size: int = 4,
) -> QwenImageEmbedder:
    """The Qwen2.5-VL embedder of a model folder (a path or an opened `ModelFolder`): its converted weights in qwen/
    (on `mesh`, straight into their sharding, when given), its tokenizer / image processor in qwen_processor/, its
    "qwen" entry's config (another family's folder, whose Qwen2.5-VL is borrowed: the default) unless `config` is
    given. A Qwen-Image-Edit folder's transformer must take the Qwen2.5-VL's width (joint_attention_dim)."""
    from jaxedit.configs import QwenImageConfig

    if not isinstance(folder, ModelFolder) and not (Path(folder) / "jaxedit.json").is_file():
        if (Path(folder) / "config.json").is_file():
            raise ValueError(f"{folder} is a transformers folder, not a model folder: convert the release first")
    opened = ModelFolder.of(folder)
    ours = isinstance(opened.preset.transformer, QwenImageConfig)  # a Qwen-Image-Edit folder (else: borrowed)
    section = qwen_section(opened) if ours else qwen_vl.read_qwen_section(opened, dict)
    if section.model is None or not (opened.path / "qwen").is_dir():
        raise FileNotFoundError(f"{opened.path} holds no converted Qwen2.5-VL (qwen/ and its jaxedit.json entry)")
    qwen_cfg = section.model
    width = opened.preset.transformer.joint_attention_dim if ours else qwen_cfg.text.hidden_size
    if qwen_cfg.text.hidden_size != width:
        raise ValueError(
            f"{opened.path}: Qwen2.5-VL hidden size {qwen_cfg.text.hidden_size} != the transformer's "
            f"joint_attention_dim {width}"
        )
    config = config or (section.config if ours else PLUS)
    tokenizer, image_processor = QwenImageEmbedder.load_processor(opened.path / QWEN_PROCESSOR)
    encoder = qwen_vl.QwenVLEncoder.load(
        opened.path / "qwen", qwen_cfg, dtype=dtype, attention_impl=attention_impl, batch_size=batch_size, mesh=mesh
    )
    return QwenImageEmbedder(encoder, tokenizer, image_processor, config, name=opened.path.resolve())
