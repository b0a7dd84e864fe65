"""The PyTorch (transformers) Step1X-Edit conditioner: the reference the JAX embedder is tested against.

Same prompt rendering, resizing, re-tokenisation, drop and padding (`QwenConditioner`); the model is
transformers' `Qwen2_5_VLForConditionalGeneration`, run one item at a time as S1X's conditioner does.
Test-time only (torch is no dependency of the library).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from jaxedit.step1x.text import QwenConditioner, QwenEmbedderConfig


class TorchQwenEmbedder(QwenConditioner):
    def __init__(self, model, tokenizer, image_processor, chat_template: str, config: QwenEmbedderConfig, name=""):
        mcfg = model.config
        super().__init__(
            tokenizer, image_processor, chat_template, config, image_token_id=mcfg.image_token_id,
            vision_end_id=mcfg.vision_end_token_id, hidden_size=getattr(mcfg, "text_config", mcfg).hidden_size,
            name=name,
        )  # fmt: skip
        self.model = model

    @classmethod
    def from_pretrained(
        cls, path, config: QwenEmbedderConfig | None = None, *, dtype: str = "float32", attn_implementation="sdpa"
    ) -> TorchQwenEmbedder:
        import torch
        import transformers

        path, config = Path(path), config or QwenEmbedderConfig()
        model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            local_files_only=True,
            use_safetensors=True,
        )
        model = model.eval().requires_grad_(False)
        return cls(model, *cls.load_processor(path, config), config, name=path.resolve())

    def hidden_states(self, inputs: dict[str, Any]) -> np.ndarray:
        import torch

        ids = torch.from_numpy(inputs["input_ids"])[None]
        kw = {}
        if "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:  # transformers 5: 3-D rope
            kw["mm_token_type_ids"] = (ids == self.image_token_id).int()
        with torch.no_grad():
            out = self.model(
                input_ids=ids,
                attention_mask=(ids > 0).long(),
                pixel_values=torch.from_numpy(inputs["pixel_values"]),
                image_grid_thw=torch.from_numpy(inputs["image_grid_thw"]),
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=False,
                **kw,
            )
        return out.hidden_states[-1][0].float().numpy()
