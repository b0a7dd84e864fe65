"""Step1X-Edit text conditioning: Qwen2.5-VL-7B last hidden states of (instruction, reference image).

Follows S1X `modules/conditioner.py` (Qwen25VL_7b_Embedder):

1. messages = [user: PREFIX text, the reference image, the instruction]; the chat template is
   rendered with add_generation_prompt and add_vision_id ("Picture 1: " before the image).
2. The image is resized as qwen_vl_utils' `process_vision_info` does (sides rounded to
   multiples of patch*merge = 28, 4..16384 merged patches, PIL's default bicubic), then the
   image processor resizes it again within [min_pixels, max_pixels] (256..324 x 28^2).
3. Quoted text is re-tokenised (`split_quoted`): after character 155 of the rendered text,
   every character between double quotes (also curly quotes and ' which become ") is
   tokenised alone, wrapped as “c”, and the wrapping quote tokens are stripped again when
   they came out as separate tokens. Ids up to the first <|vision_end|> come from the plain
   tokenisation (with the image pads expanded), the rest from the re-tokenised pieces.
4. attention_mask = ids > 0 (as the reference; Qwen2's id 0 is "!"); the output is the
   last hidden state; the first `drop_tokens` (217: system prompt + PREFIX) are dropped,
   the rest truncated to `max_length` (640) and zero-padded; mask 1 on kept tokens.

The model is the JAX Qwen2.5-VL (`jaxedit.models.qwen2_5_vl`, no torch): `Step1XQwenEmbedder` runs
several items at once, padded to shape buckets, one jitted program per bucket (the shared
`jaxedit.qwen_vl.QwenVLEncoder`, also Qwen-Image-Edit's). `QwenConditioner` holds
everything but the model (the PyTorch reference of the tests subclasses it too). A model folder holds
the converted weights in qwen/ and the tokenizer / image processor / chat template in qwen_processor/
(`load_qwen_embedder`). Outputs are numpy and can be cached per item (`save_embedding` /
`load_embedding`, or `encode(..., cache_dir=...)`).

Known difference: rows of tokens masked out by `ids > 0` (each "!") depend on the attention
kernel; the reference's flash-attention zeroes their attention output, SDPA does not (ours
attends their earlier unmasked keys, as SDPA).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxedit import qwen_vl
from jaxedit.model_folder import ModelFolder
from jaxedit.qwen_vl import QWEN_PROCESSOR, QwenSection, load_embedding, save_embedding, smart_resize

log = logging.getLogger(__name__)

PREFIX = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:\n"
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.\n"
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.\n\n"
    "Here are examples of how to transform or refine prompts:\n"
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.\n\n"
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:\n"
    "User Prompt:"
)
OPEN_QUOTE, CLOSE_QUOTE = "\u201c", "\u201d"  # “ ”


@dataclasses.dataclass(frozen=True)
class QwenEmbedderConfig:
    """Numbers of Step1X-Edit's Qwen2.5-VL conditioning (defaults: the released 7B setup)."""

    hidden_size: int = 3584  # Qwen2.5-VL-7B; = the connector's in_channels
    max_length: int = 640  # tokens kept after the drop
    drop_tokens: int = 217  # leading tokens dropped (system prompt + PREFIX)
    min_pixels: int = 256 * 28 * 28  # image processor bounds
    max_pixels: int = 324 * 28 * 28
    quote_ids: tuple[int, int] = (2073, 854)  # token ids of “ and ” in Qwen2's vocabulary
    quote_after: int = 155  # quotes at character index <= this are left alone
    vision_min_tokens: int = 4  # qwen_vl_utils' resize bounds, in merged patches
    vision_max_tokens: int = 16384

    @classmethod
    def from_dict(cls, d: dict) -> QwenEmbedderConfig:
        return qwen_vl.config_from_dict(cls, d, "Qwen embedder")


def qwen_entry(path: str | Path | None, config: QwenEmbedderConfig | None = None, model=None) -> dict:
    """The "qwen" entry of a Step1X-Edit model folder's description (`model_folder.write_description(...,
    extra=...)`): a transformers Qwen2.5-VL folder (absolute, or None), the embedder config and the
    architecture (a `QwenVLConfig`) of the Qwen2.5-VL converted into the folder's qwen/ (None: none)."""
    return qwen_vl.qwen_entry(path, config or QwenEmbedderConfig(), model)


def qwen_section(folder: ModelFolder) -> QwenSection:
    """The "qwen" entry of an opened Step1X-Edit model folder (the one place it is interpreted; `qwen_entry`
    writes it): its config a `QwenEmbedderConfig`."""
    return qwen_vl.read_qwen_section(folder, QwenEmbedderConfig.from_dict)


def read_qwen(folder: str | Path | ModelFolder) -> tuple[Path | None, QwenEmbedderConfig]:
    """(Qwen2.5-VL folder or None if none is recorded, QwenEmbedderConfig) of a Step1X-Edit model folder."""
    section = qwen_section(ModelFolder.of(folder))
    return section.path, section.config


def split_quoted(text: str, quote_after: int = 155) -> list[str]:
    """Pieces to tokenise one by one: outside quotes, runs of text (an opening quote closes its
    run, a closing quote starts the next); inside, each character alone as “c”.

    Curly double quotes and ' are first turned into ", as the reference does (so an apostrophe
    opens a quote too); quotes at index <= quote_after are ordinary characters.
    """
    text = text.replace(OPEN_QUOTE, '"').replace(CLOSE_QUOTE, '"').replace("'", '"')
    pieces: list[str] = []
    run, inside = "", False
    for i, ch in enumerate(text):
        if ch == '"' and i > quote_after:
            run += ch
            if not inside:
                pieces.append(run)
                run = ""
            inside = not inside
        elif inside:
            pieces.append(OPEN_QUOTE + ch + CLOSE_QUOTE)
        else:
            run += ch
    if run:
        pieces.append(run)
    return pieces


def vision_input_image(image: Image.Image, factor: int = 28, min_tokens: int = 4, max_tokens: int = 16384):
    """The image as qwen_vl_utils' `fetch_image` hands it to the processor (RGB, resized)."""
    if image.mode == "RGBA":  # composited on white, as qwen_vl_utils does
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(image, mask=image.split()[3])
        image = rgb
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, factor, min_tokens * factor**2, max_tokens * factor**2)
    return image.resize((w, h))


# ----------------------------------------------------------------------------------------


def _chat_template(path: Path, tokenizer) -> str:
    """The processor's chat template (chat_template.json / .jinja), else the tokenizer's."""
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise FileNotFoundError(f"{path}: no chat template (chat_template.json, chat_template.jinja or the tokenizer's)")


class QwenConditioner:
    """Everything of Step1X-Edit's conditioning but the model: prompt rendering, image resizing, quoted-text
    re-tokenisation (`prepare_inputs`), the 217-token drop and the padding to `max_length`, the per-item
    cache. Subclasses give the model: `hidden_states(inputs)` for one item, or `embed_items` for a batch.

    tokenizer, image_processor: the Qwen2.5-VL tokenizer and `Qwen2VLImageProcessorPil` (min/max pixels
    set); chat_template: the processor's template."""

    def __init__(
        self, tokenizer, image_processor, chat_template: str, config: QwenEmbedderConfig, *,
        image_token_id: int, vision_end_id: int, hidden_size: int, name="",
    ):  # fmt: skip
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.chat_template, self.config, self.name = chat_template, config, str(name)
        if hidden_size != config.hidden_size:
            raise ValueError(f"Qwen hidden size {hidden_size} != embedder config hidden_size {config.hidden_size}")
        self.vision_end_id, self.image_token_id = vision_end_id, image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge_size = image_processor.merge_size
        for q, want in zip((OPEN_QUOTE, CLOSE_QUOTE), config.quote_ids):
            got = tokenizer(q)["input_ids"]
            if len(got) == 1 and got[0] != want:
                log.warning("tokenizer encodes %s as %d but the embedder config says %d", q, got[0], want)

    @staticmethod
    def load_processor(path: Path, config: QwenEmbedderConfig):
        """(tokenizer, image processor, chat template) of a folder (no torch: the PIL image processor)."""
        tokenizer = qwen_vl.load_tokenizer(path)
        # the PIL backend (transformers 5) = the slow processor the reference's transformers 4.49 used
        image_processor = qwen_vl.load_image_processor(path, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        return tokenizer, image_processor, _chat_template(path, tokenizer)

    # ------------------------------------------------------------------------------------

    def chat_text(self, prompt: str) -> str:
        """The rendered chat: system prompt, PREFIX, "Picture 1: " + vision tokens, prompt, assistant turn."""
        content = [{"type": "text", "text": PREFIX}, {"type": "image"}, {"type": "text", "text": prompt}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
            add_vision_id=True,
        )

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def prepare_inputs(self, prompt: str, image: Image.Image) -> dict[str, Any]:
        """Model inputs of one item (numpy): input_ids [L] int64, attention_mask [L] (ids > 0), pixel_values
        [N, patch_dim], image_grid_thw [1, 3]."""
        cfg, factor = self.config, self.image_processor.patch_size * self.merge_size
        image = vision_input_image(image, factor, cfg.vision_min_tokens, cfg.vision_max_tokens)
        vision = self.image_processor(images=[image], return_tensors="np")
        n_image = int(vision["image_grid_thw"][0].prod()) // self.merge_size**2
        text = self.chat_text(prompt)
        plain = self._ids(text.replace(self.image_token, self.image_token * n_image, 1))
        pieces = []
        for piece in split_quoted(text, cfg.quote_after):
            ids = self._ids(piece)
            if len(ids) > 1 and ids[0] == cfg.quote_ids[0] and ids[-1] == cfg.quote_ids[1]:
                ids = ids[1:-1]
            pieces += ids
        cut_plain, cut_pieces = plain.index(self.vision_end_id), pieces.index(self.vision_end_id)
        input_ids = np.asarray(plain[:cut_plain] + pieces[cut_pieces:], np.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids > 0).astype(np.int32),  # as the reference: attention_mask = ids > 0
            "pixel_values": np.asarray(vision["pixel_values"], np.float32),
            "image_grid_thw": np.asarray(vision["image_grid_thw"], np.int64),
        }

    def hidden_states(self, inputs: dict[str, Any]) -> np.ndarray:
        """Last hidden state [L, hidden] (float32 numpy) of one item's `prepare_inputs` output."""
        raise NotImplementedError

    def crop(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [max_length, hidden], mask [max_length]): the rows after `drop_tokens`, zero-padded."""
        cfg = self.config
        n = min(cfg.max_length, len(hidden) - cfg.drop_tokens)
        if n <= 0:
            raise ValueError(f"{len(hidden)} tokens, not more than drop_tokens={cfg.drop_tokens}")
        emb = np.zeros((cfg.max_length, cfg.hidden_size), np.float32)
        emb[:n] = hidden[cfg.drop_tokens : cfg.drop_tokens + n]
        mask = np.zeros(cfg.max_length, np.int32)
        mask[:n] = 1
        return emb, mask

    def embed_one(self, prompt: str, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [max_length, hidden], mask [max_length]) of one (instruction, image)."""
        return self.crop(self.hidden_states(self.prepare_inputs(prompt, image)))

    def embed_items(self, items: Sequence[tuple[str, Image.Image]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """`embed_one` of each (prompt, image); subclasses batch them."""
        return [self.embed_one(p, im) for p, im in items]

    def cache_key(self, prompt: str, image: Image.Image) -> str:
        """A file name for one item's output: hash of model name, config, prompt and image pixels."""
        image = image.convert("RGB")
        h = hashlib.sha256(json.dumps([self.name, dataclasses.asdict(self.config), prompt, image.size]).encode())
        h.update(image.tobytes())
        return h.hexdigest()[:32]

    def encode(
        self, prompts: Sequence[str], images: Sequence[Image.Image], *, cache_dir: str | Path | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items (prompt_i, image_i) -> (embeddings [B, max_length, hidden], mask [B, max_length]).

        cache_dir: read each item from `<cache_dir>/<cache_key>.npz` when present, else compute
        (the missing ones together, `embed_items`) and write it there."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        paths = [
            Path(cache_dir) / f"{self.cache_key(p, im)}.npz" if cache_dir else None for p, im in zip(prompts, images)
        ]
        out: list[Any] = [load_embedding(path) if path is not None and path.is_file() else None for path in paths]
        todo = [i for i, o in enumerate(out) if o is None]
        for i, item in zip(todo, self.embed_items([(prompts[i], images[i]) for i in todo]) if todo else []):
            if paths[i] is not None:
                save_embedding(paths[i], *item)
            out[i] = item
        return np.stack([e for e, _ in out]), np.stack([m for _, m in out])

    __call__ = encode


class Step1XQwenEmbedder(QwenConditioner):
    """Step1X-Edit's conditioning on the JAX Qwen2.5-VL: `encode(prompts, images)` -> (embeddings
    [B, max_length, hidden] float32, mask [B, max_length] int32), items run `batch_size` at a time through
    one jitted program per (items, tokens, image patches) bucket (`jaxedit.qwen_vl.QwenVLEncoder`).

    params: `QwenVL(qwen_cfg)` parameters (a model folder's qwen/: `from_model_folder`; a transformers folder
    converted as it is read: `checkpoints_convert.step1x.qwen_embedder`), or an `encoder` built already; dtype:
    compute dtype (bfloat16 as the reference runs it); mesh: shard the weights by the logical rules (FSDP,
    tensor) and split the items over the batch axes (a batch is padded with empty rows to a multiple of them)."""

    def __init__(
        self, params, qwen_cfg, tokenizer, image_processor, chat_template: str, config: QwenEmbedderConfig, *,
        dtype="bfloat16", attention_impl: str = "auto", batch_size: int = 4, name="", mesh=None, encoder=None,
    ):  # fmt: skip
        super().__init__(
            tokenizer, image_processor, chat_template, config, image_token_id=qwen_cfg.image_token_id,
            vision_end_id=qwen_cfg.vision_end_token_id, hidden_size=qwen_cfg.text.hidden_size, name=name,
        )  # fmt: skip
        self.encoder = encoder or qwen_vl.QwenVLEncoder(
            params, qwen_cfg, dtype=dtype, attention_impl=attention_impl, batch_size=batch_size, mesh=mesh
        )
        self.qwen_cfg = qwen_cfg
        self.name = f"{self.name} ({self.encoder.dtype.name})"  # the cache key: a bfloat16 run is another result

    @property
    def params(self):
        return self.encoder.params

    @property
    def mesh(self):
        """The mesh the Qwen2.5-VL weights are sharded over (None: one device)."""
        return self.encoder.mesh

    @classmethod
    def from_model_folder(
        cls, folder: str | Path | ModelFolder, *, dtype: str = "bfloat16", **kw
    ) -> Step1XQwenEmbedder:
        """The converted Qwen2.5-VL of a Step1X-Edit model folder (qwen/ weights, qwen_processor/ files; a path
        or an opened `ModelFolder`)."""
        opened = ModelFolder.of(folder)
        folder, section = opened.path, qwen_section(opened)
        if section.model is None:
            raise FileNotFoundError(f"{folder}/jaxedit.json describes no converted Qwen2.5-VL")
        qwen_cfg, config = section.model, section.config
        check_hidden(qwen_cfg, config, folder)
        encoder = qwen_vl.QwenVLEncoder.load(folder / "qwen", qwen_cfg, dtype=dtype, **kw)
        processor = cls.load_processor(folder / QWEN_PROCESSOR, config)
        return cls(None, qwen_cfg, *processor, config, name=folder.resolve(), encoder=encoder)

    def hidden_states(self, inputs: dict[str, Any]) -> np.ndarray:
        return self.encoder.last_hidden_states([inputs])[0]

    def embed_items(self, items):
        out, size = [], self.encoder.batch_size
        for start in range(0, len(items), size):
            chunk = [self.prepare_inputs(p, im) for p, im in items[start : start + size]]
            out += [self.crop(h) for h in self.encoder.last_hidden_states(chunk)]
        return out


def check_hidden(qwen_cfg, config: QwenEmbedderConfig, where) -> None:
    if qwen_cfg.text.hidden_size != config.hidden_size:
        raise ValueError(
            f"{where}: Qwen2.5-VL hidden size {qwen_cfg.text.hidden_size} != the embedder's (the connector's "
            f"in_channels) {config.hidden_size}"
        )


def qwen_config(folder: str | Path | ModelFolder):
    """The `QwenVLConfig` of the converted Qwen2.5-VL a model folder's jaxedit.json describes."""
    opened = ModelFolder.of(folder)
    model = qwen_section(opened).model
    if model is None:
        raise FileNotFoundError(f"{opened.path}/jaxedit.json describes no converted Qwen2.5-VL")
    return model


def open_qwen_folder(qwen: str | Path | ModelFolder) -> ModelFolder:
    """The model folder whose converted Qwen2.5-VL to use, opened; ValueError for a transformers Qwen2.5-VL
    folder (convert it in first)."""
    if isinstance(qwen, ModelFolder):
        return qwen
    qwen = Path(qwen)
    if (qwen / "config.json").is_file() and not (qwen / "jaxedit.json").is_file():
        raise ValueError(
            f"{qwen} is a transformers Qwen2.5-VL folder: convert it into the model folder first "
            f"(python -m checkpoints_convert add-qwen MODEL_FOLDER {qwen})"
        )
    return ModelFolder.open(qwen)


def load_qwen_embedder(
    folder: str | Path | ModelFolder, qwen: str | Path | ModelFolder | None = None, **kw
) -> Step1XQwenEmbedder:
    """The Qwen2.5-VL embedder of a Step1X-Edit model folder (its qwen/ and qwen_processor/), or of the model
    folder `qwen` when given (one converted Qwen2.5-VL shared by several folders); each a path or an opened
    `ModelFolder`. A transformers Qwen2.5-VL folder is converted first: `python -m checkpoints_convert add-qwen
    FOLDER QWEN` (no torch either way). Its width must be the model folder's connector's in_channels."""
    source = open_qwen_folder(folder if qwen is None else qwen)
    model = source if qwen is None else ModelFolder.of(folder)
    if not (source.path / "qwen").is_dir():
        recorded = qwen_section(source).path
        hint = f"python -m checkpoints_convert add-qwen {source.path} {recorded or 'QWEN_FOLDER'}"
        raise FileNotFoundError(f"{source.path} holds no converted Qwen2.5-VL (no qwen/); add one: {hint}")
    embedder = Step1XQwenEmbedder.from_model_folder(source, **kw)
    connector = model.preset.connector
    if connector is not None and embedder.config.hidden_size != connector.in_channels:
        raise ValueError(
            f"{source.path}: Qwen2.5-VL hidden size {embedder.config.hidden_size} != the connector's in_channels "
            f"{connector.in_channels} of {model.path}"
        )
    return embedder
