"""A tiny Qwen2.5-VL (every parameter random) with a tokenizer trained offline, saved as a
local model folder (`build_tiny_qwen_vl`; the Step1X and Qwen-Image tests), and the Step1X `QwenEmbedderConfig`
that fits it (`build_tiny_qwen`)."""

from __future__ import annotations

from pathlib import Path

from jaxedit import presets
from jaxedit.step1x.text import PREFIX, QwenEmbedderConfig
from jaxedit.tokenizers_offline import SENTENCES, train_qwen_tokenizer

HIDDEN = presets.get("step1x-edit-tiny").connector.in_channels
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 9 * 28 * 28


def build_tiny_qwen(root: Path, seed: int = 0) -> tuple[Path, QwenEmbedderConfig]:
    """Write the folder (config.json, model.safetensors, tokenizer, preprocessor_config.json)."""
    import transformers

    build_tiny_qwen_vl(root, [PREFIX, *SENTENCES], seed=seed, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    tok = transformers.AutoTokenizer.from_pretrained(root)

    # the leading tokens to drop: system prompt + PREFIX (217 for the real tokenizer)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": PREFIX}, {"type": "image"}]}],
        tokenize=False,
        add_vision_id=True,
    )
    head = tok(chat[: chat.index(PREFIX) + len(PREFIX)])["input_ids"]
    assert tok(chat)["input_ids"][: len(head)] == head, "the PREFIX does not end on a token boundary"
    quotes = tuple(tok(q)["input_ids"][0] for q in ("\u201c", "\u201d"))
    assert all(len(tok(q)["input_ids"]) == 1 for q in ("\u201c", "\u201d"))
    emb_cfg = QwenEmbedderConfig(
        hidden_size=HIDDEN, max_length=40, drop_tokens=len(head), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
        quote_ids=quotes,
    )  # fmt: skip
    return root, emb_cfg


def build_tiny_qwen_vl(
    root: Path, sentences: list[str], *, seed: int = 0, hidden: int = HIDDEN, min_pixels: int, max_pixels: int
) -> dict[str, int]:
    """A tiny random transformers Qwen2.5-VL (every parameter random) with a tokenizer trained on `sentences` and
    a Qwen2-VL image processor (PIL; `min_pixels` / `max_pixels`) saved at `root`; returns the special tokens' ids."""
    import transformers

    from references.random import randomize_

    ids = train_qwen_tokenizer(root, sentences)
    tok = transformers.AutoTokenizer.from_pretrained(root)
    transformers.Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    ).save_pretrained(root)
    text = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], rope_parameters={"rope_type": "default", "mrope_section": [1, 3, 3],
                                                        "rope_theta": 10000.0},
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=hidden, window_size=56, fullatt_block_indexes=[1],
    )  # fmt: skip
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(root)
    return ids


def load_tiny_qwen(path: Path):
    """(transformers' float32 reference, our QwenVLConfig, our float32 parameters converted by our converter, the
    image processor) of a folder written by `build_tiny_qwen_vl`."""
    import json

    import jax.numpy as jnp
    import torch
    import transformers

    from checkpoints_convert import load_part
    from jaxedit.configs import QwenVLConfig

    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, use_safetensors=True
    ).eval()
    cfg = QwenVLConfig.from_hf(json.loads((path / "config.json").read_text()))
    params = load_part("qwen", path, cfg, dtype=jnp.float32)
    return ref, cfg, params, transformers.Qwen2VLImageProcessorPil.from_pretrained(path)
