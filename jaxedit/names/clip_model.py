"""Name table of transformers' `CLIPModel` (both towers, their projections) -> `jaxedit.models.clip_vision.CLIPModel`.

The text tower is the text encoders' table (`jaxedit.names.text.clip_rules`) under `text_model.` /
`text_model/`; the vision tower's names are transformers' with "/" and its `layers.N` stacked (`vision_model/
layers`); the patch embedding (a conv without bias) becomes a Dense over flattened patches ("patch_linear").
A saved `position_ids` buffer of either tower is no parameter (the converter checks it: `POSITION_IDS`).
"""

from __future__ import annotations

import dataclasses

from jaxedit.models.clip_vision import CLIPModelConfig, CLIPVisionConfig
from jaxedit.names import Rule, copy, linear
from jaxedit.names.text import clip_encoder_rules, clip_rules

TEXT, VISION = "text_model", "vision_model"
POSITION_IDS = (f"{TEXT}.embeddings.position_ids", f"{VISION}.embeddings.position_ids")


def vision_rules(cfg: CLIPVisionConfig) -> list[Rule]:
    """transformers `CLIPVisionTransformer` (without `vision_model.`) -> `CLIPVisionTransformer` params."""
    rules = [Rule("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", "patch_linear")]
    rules += copy("embeddings.class_embedding", "embeddings/class_embedding")
    rules += copy("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding")
    for n in ("pre_layrnorm", "post_layernorm"):
        rules += copy(f"{n}.weight", f"{n}/weight") + copy(f"{n}.bias", f"{n}/bias")
    return rules + clip_encoder_rules(cfg.num_layers)


def _under(rules: list[Rule], src: str, dst: str) -> list[Rule]:
    return [dataclasses.replace(r, src=f"{src}.{r.src}", dst=f"{dst}/{r.dst}") for r in rules]


def clip_model_rules(cfg: CLIPModelConfig) -> list[Rule]:
    """transformers `CLIPModel` -> `CLIPModel` params: both towers, the two projections (no bias), logit_scale."""
    rules = _under(clip_rules(cfg.text), TEXT, TEXT) + _under(vision_rules(cfg.vision), VISION, VISION)
    rules += linear("visual_projection", "visual_projection", bias=False)
    rules += linear("text_projection", "text_projection", bias=False)
    return rules + copy("logit_scale", "logit_scale")
