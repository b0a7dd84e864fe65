"""Qwen2.5-VL files (transformers `Qwen2_5_VLForConditionalGeneration` safetensors): which of the two key
layouts (transformers 5 or 4) they are in, each handled explicitly (anything else is an unknown key); the key
table is the library's (`jaxedit.names.qwen2_5_vl`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from checkpoints_convert.mapping import ConversionError, Rule
from jaxedit.configs import QwenVLConfig
from jaxedit.names import qwen2_5_vl as names
from jaxedit.names.qwen2_5_vl import LAYOUTS

__all__ = ["FORMATS", "LAYOUTS", "QWEN_PROCESSOR_FILES", "QWEN_PROCESSOR_NEEDED", "copy_qwen_processor", "layout",
           "layout_name", "qwen_rules"]  # fmt: skip

FORMATS = ("transformers",)
QWEN_PROCESSOR_NEEDED = ("config.json", "tokenizer_config.json", "preprocessor_config.json")
QWEN_PROCESSOR_FILES = QWEN_PROCESSOR_NEEDED + (
    "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip


def layout_name(keys: Iterable[str]) -> str:
    """The key layout of a file's keys: "transformers5" or "transformers4"."""
    keys = list(keys)
    if any(k.startswith("model.language_model.") or k.startswith("model.visual.") for k in keys):
        return "transformers5"
    if any(k.startswith("visual.") for k in keys) or any(k.startswith("model.layers.") for k in keys):
        return "transformers4"
    raise ConversionError("no Qwen2.5-VL keys (model.visual.* / visual.*, model.language_model.* / model.layers.*)")


def layout(keys: Iterable[str]) -> tuple[str, str]:
    """(vision prefix, language-model prefix) of a file's keys."""
    return LAYOUTS[layout_name(keys)]


def qwen_rules(cfg: QwenVLConfig, keys: Iterable[str], fmt: str | None = None) -> list[Rule]:
    """transformers Qwen2.5-VL -> `jaxedit.models.qwen2_5_vl.QwenVL` params (the library's table, in the file's
    key layout)."""
    if fmt not in (None, *FORMATS):
        raise ConversionError(f"unknown Qwen2.5-VL checkpoint format {fmt!r}; choose from {FORMATS}")
    return names.qwen_rules(cfg, layout_name(keys))


def read_config(folder: str | Path, width: int | None = None, what: str = "") -> QwenVLConfig:
    """The `QwenVLConfig` of a transformers Qwen2.5-VL folder (its config.json), its hidden size checked against
    `width` when given (`what`: the model's part that takes it, for the message). FileNotFoundError /
    ConversionError naming the folder or file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"Qwen2.5-VL folder not found: {folder} (no config.json)")
    try:
        cfg = QwenVLConfig.from_hf(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from None
    if width is not None and cfg.text.hidden_size != width:
        raise ConversionError(f"{folder}: hidden size {cfg.text.hidden_size} != {what} {width}")
    return cfg


def copy_qwen_processor(qwen: Path, dst: Path) -> None:
    """The tokenizer, image processor and chat template files of `qwen` into `dst` (written beside, sealed,
    renamed)."""
    import shutil

    from jaxedit.checkpoint import recover_dir, seal
    from jaxedit.staged import staged_dir

    recover_dir(dst)  # a cut earlier replacement first: then the leftovers can go
    with staged_dir(dst) as tmp:
        for f in QWEN_PROCESSOR_FILES:
            if (qwen / f).is_file():
                shutil.copy2(qwen / f, tmp / f)
        seal(tmp)
