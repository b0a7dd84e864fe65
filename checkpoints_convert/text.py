"""The text encoders' files: transformers' T5EncoderModel and CLIPTextModel, read with the library's key
tables (`jaxedit.names.text`).

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

from checkpoints_convert.mapping import Check, Rule
from jaxedit.configs import CLIPTextConfig, T5Config
from jaxedit.names import text as names
from jaxedit.names.text import CLIP_PREFIX, T5_EMBEDDINGS

__all__ = ["CLIP_POSITION_IDS", "CLIP_PREFIX", "FORMATS", "T5_EMBEDDINGS", "clip_prefix", "clip_rules", "t5_rules"]

FORMATS = ("transformers",)
CLIP_POSITION_IDS = "embeddings.position_ids"


def _check_format(fmt: str | None) -> None:
    if fmt not in (None, *FORMATS):
        raise ValueError(f"unknown text encoder checkpoint format {fmt!r}; choose from {FORMATS}")


def t5_rules(cfg: T5Config, keys: Iterable[str], fmt: str | None = None) -> list[Rule | Check]:
    """transformers `T5EncoderModel` -> `T5Encoder` params (the layer-0 bias table is top level): the library's
    table, reading the input embedding from whichever of its two tied names the file has."""
    _check_format(fmt)
    keys = set(keys)
    shared, embed_tokens = T5_EMBEDDINGS
    if embed_tokens in keys and shared not in keys:
        return names.t5_rules(cfg, embedding=embed_tokens)
    rules: list[Rule | Check] = names.t5_rules(cfg)  # shared.weight (missing altogether: `plan` names it)
    if embed_tokens in keys:
        rules.append(Check(embed_tokens, equals=shared, why="tied input embedding"))
    return rules


def clip_prefix(keys: Iterable[str]) -> str | None:
    """`text_model.` when every key carries it (files saved by transformers < 5)."""
    keys = list(keys)
    return CLIP_PREFIX if keys and all(k.startswith(CLIP_PREFIX) for k in keys) else None


def _position_ids(shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.arange(shape[-1]), shape)


def clip_rules(cfg: CLIPTextConfig, keys: Iterable[str], fmt: str | None = None) -> list[Rule | Check]:
    """transformers `CLIPTextModel` (prefix already stripped) -> `CLIPTextModel` params: the library's table,
    and a check of the position ids buffer if the file holds one."""
    _check_format(fmt)
    rules: list[Rule | Check] = names.clip_rules(cfg)
    if CLIP_POSITION_IDS in set(keys):
        rules.append(Check(CLIP_POSITION_IDS, value=_position_ids, why="position ids buffer: arange(max_positions)"))
    return rules
