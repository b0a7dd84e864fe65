"""Key tables for the text encoders: transformers' T5EncoderModel and CLIPTextModel files.

Published files differ from the reference module trees in a few known, named ways,
each handled explicitly here (anything else unknown is an error):
  - T5: `shared.weight` and `encoder.embed_tokens.weight` are one tied tensor; a file may
    hold both (then they must be equal: `shared.weight` is loaded, the copy is checked),
    or only one of them (transformers 5 writes `shared.weight` only).
  - CLIP: files written by older transformers carry the `text_model.` prefix (stripped
    when every key has it) and sometimes the `embeddings.position_ids` buffer (checked to
    be arange(max_position_embeddings), not loaded).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from checkpoints_convert.mapping import Check, Rule, copy, linear
from jaxedit.configs import CLIPTextConfig, T5Config

FORMATS = ("transformers",)
T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
CLIP_PREFIX = "text_model."
CLIP_POSITION_IDS = "embeddings.position_ids"


def _check_format(fmt: str | None) -> None:
    if fmt not in (None, *FORMATS):
        raise ValueError(f"unknown text encoder checkpoint format {fmt!r}; choose from {FORMATS}")


def t5_rules(cfg: T5Config, keys: Iterable[str], fmt: str | None = None) -> list[Rule | Check]:
    """transformers `T5EncoderModel` -> `T5Encoder` params (the layer-0 bias table is top level)."""
    _check_format(fmt)
    keys = set(keys)
    shared, embed_tokens = T5_EMBEDDINGS
    if embed_tokens in keys and shared not in keys:
        rules: list[Rule | Check] = copy(embed_tokens, "shared/embedding")
    else:  # shared.weight (missing altogether: `plan` reports it by name)
        rules = copy(shared, "shared/embedding")
        if embed_tokens in keys:
            rules.append(Check(embed_tokens, equals=shared, why="tied input embedding"))
    rules += copy("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative_attention_bias")
    rules += copy("encoder.final_layer_norm.weight", "final_layer_norm/weight")
    for i in range(cfg.num_layers):
        s, d = f"encoder.block.{i}.layer", "block"
        for n in ("q", "k", "v", "o"):
            rules += linear(f"{s}.0.SelfAttention.{n}", f"{d}/layer_0/SelfAttention/{n}", layer=i, bias=False)
        rules += copy(f"{s}.0.layer_norm.weight", f"{d}/layer_0/layer_norm/weight", layer=i)
        for n in ("wi_0", "wi_1", "wo"):
            rules += linear(f"{s}.1.DenseReluDense.{n}", f"{d}/layer_1/DenseReluDense/{n}", layer=i, bias=False)
        rules += copy(f"{s}.1.layer_norm.weight", f"{d}/layer_1/layer_norm/weight", layer=i)
    return rules


def clip_prefix(keys: Iterable[str]) -> str | None:
    """`text_model.` when every key carries it (files saved by transformers < 5)."""
    keys = list(keys)
    return CLIP_PREFIX if keys and all(k.startswith(CLIP_PREFIX) for k in keys) else None


def _position_ids(shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.arange(shape[-1]), shape)


def clip_rules(cfg: CLIPTextConfig, keys: Iterable[str], fmt: str | None = None) -> list[Rule | Check]:
    """transformers `CLIPTextModel` (prefix already stripped) -> `CLIPTextModel` params."""
    _check_format(fmt)
    rules: list[Rule | Check] = []
    rules += copy("embeddings.token_embedding.weight", "embeddings/token_embedding/embedding")
    rules += copy("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding")
    if CLIP_POSITION_IDS in set(keys):
        rules.append(Check(CLIP_POSITION_IDS, value=_position_ids, why="position ids buffer: arange(max_positions)"))
    rules += copy("final_layer_norm.weight", "final_layer_norm/weight")
    rules += copy("final_layer_norm.bias", "final_layer_norm/bias")
    for i in range(cfg.num_layers):
        s, d = f"encoder.layers.{i}", "layers"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += linear(f"{s}.self_attn.{n}", f"{d}/self_attn/{n}", layer=i)
        for n in ("fc1", "fc2"):
            rules += linear(f"{s}.mlp.{n}", f"{d}/mlp/{n}", layer=i)
        for n in ("layer_norm1", "layer_norm2"):
            rules += copy(f"{s}.{n}.weight", f"{d}/{n}/weight", layer=i)
            rules += copy(f"{s}.{n}.bias", f"{d}/{n}/bias", layer=i)
    return rules
