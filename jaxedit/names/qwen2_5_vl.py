"""Name table of Qwen2.5-VL (transformers `Qwen2_5_VLForConditionalGeneration`) -> jaxedit `QwenVL` params.

Two key layouts exist (`LAYOUTS`: the prefixes of the vision tower and of the language model):
  - transformers 5 (and the manifest): `model.visual.*`, `model.language_model.*`, `lm_head.weight`;
  - transformers 4 (the published Qwen2.5-VL-7B-Instruct files): `visual.*`, `model.*`, `lm_head.weight`.
The 3-D patch convolution [width, 3, 2, 14, 14] becomes the matmul kernel [3 * 2 * 14 * 14, width];
Linear weights are transposed; a tied lm_head (tie_word_embeddings) has no tensor of its own.
"""

from __future__ import annotations

from jaxedit.configs import QwenVLConfig
from jaxedit.names import Rule, copy, linear

# layout -> (vision prefix, language-model prefix)
LAYOUTS = {"transformers5": ("model.visual.", "model.language_model."), "transformers4": ("visual.", "model.")}


def qwen_rules(cfg: QwenVLConfig, layout: str = "transformers5") -> list[Rule]:
    """transformers Qwen2.5-VL in `layout` -> `jaxedit.models.qwen2_5_vl.QwenVL` params."""
    vis, lm = LAYOUTS[layout]
    rules = [Rule(f"{vis}patch_embed.proj.weight", "visual/patch_embed/kernel", "patch_linear")]
    for i in range(cfg.vision.depth):
        s, d = f"{vis}blocks.{i}", "visual/blocks"
        rules += copy(f"{s}.norm1.weight", f"{d}/norm1/weight", layer=i)
        rules += copy(f"{s}.norm2.weight", f"{d}/norm2/weight", layer=i)
        rules += linear(f"{s}.attn.qkv", f"{d}/qkv", layer=i)
        rules += linear(f"{s}.attn.proj", f"{d}/proj", layer=i)
        for n in ("gate_proj", "up_proj", "down_proj"):
            rules += linear(f"{s}.mlp.{n}", f"{d}/mlp/{n}", layer=i)
    rules += copy(f"{vis}merger.ln_q.weight", "visual/merger/ln_q/weight")
    rules += linear(f"{vis}merger.mlp.0", "visual/merger/mlp_0")
    rules += linear(f"{vis}merger.mlp.2", "visual/merger/mlp_2")
    rules += copy(f"{lm}embed_tokens.weight", "language_model/embed_tokens/embedding")
    rules += copy(f"{lm}norm.weight", "language_model/norm/weight")
    for i in range(cfg.text.num_layers):
        s, d = f"{lm}layers.{i}", "language_model/layers"
        for n in ("q_proj", "k_proj", "v_proj"):
            rules += linear(f"{s}.self_attn.{n}", f"{d}/{n}", layer=i)
        rules += linear(f"{s}.self_attn.o_proj", f"{d}/o_proj", layer=i, bias=False)
        for n in ("gate_proj", "up_proj", "down_proj"):
            rules += linear(f"{s}.mlp.{n}", f"{d}/mlp/{n}", layer=i, bias=False)
        rules += copy(f"{s}.input_layernorm.weight", f"{d}/input_layernorm/weight", layer=i)
        rules += copy(f"{s}.post_attention_layernorm.weight", f"{d}/post_attention_layernorm/weight", layer=i)
    if not cfg.tie_word_embeddings:
        rules += linear("lm_head", "lm_head", bias=False)
    return rules
