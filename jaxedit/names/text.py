"""Name tables of the text encoders: transformers' `CLIPTextModel` and `T5EncoderModel` -> jaxedit's.

Our parameter names are transformers' module paths with "/" (CLIP without its `text_model.` wrapper:
`CLIP_PREFIX`, which files saved by transformers < 5 and LoRAs' module names may carry), the layers stacked:
`encoder.block.0.layer.1.DenseReluDense.wi_0` is layer 0 of `block/layer_1/DenseReluDense/wi_0`. T5's input
embedding is one tensor tied under two names (`T5_EMBEDDINGS`); the table reads it as `embedding`.
"""

from __future__ import annotations

from jaxedit.configs import CLIPTextConfig, T5Config
from jaxedit.names import Rule, copy, linear

CLIP_PREFIX = "text_model."
T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")


def t5_rules(cfg: T5Config, embedding: str = T5_EMBEDDINGS[0]) -> list[Rule]:
    """transformers `T5EncoderModel` -> `T5Encoder` params (the layer-0 bias table is top level)."""
    rules = copy(embedding, "shared/embedding")
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


def clip_rules(cfg: CLIPTextConfig) -> list[Rule]:
    """transformers `CLIPTextModel` (without `text_model.`) -> `CLIPTextModel` params."""
    rules = copy("embeddings.token_embedding.weight", "embeddings/token_embedding/embedding")
    rules += copy("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding")
    rules += copy("final_layer_norm.weight", "final_layer_norm/weight")
    rules += copy("final_layer_norm.bias", "final_layer_norm/bias")
    return rules + clip_encoder_rules(cfg.num_layers)


def clip_encoder_rules(num_layers: int) -> list[Rule]:
    """transformers `CLIPEncoder` (`encoder.layers.i`, the text and the vision tower's) -> stacked `layers`."""
    rules = []
    for i in range(num_layers):
        s, d = f"encoder.layers.{i}", "layers"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += linear(f"{s}.self_attn.{n}", f"{d}/self_attn/{n}", layer=i)
        for n in ("fc1", "fc2"):
            rules += linear(f"{s}.mlp.{n}", f"{d}/mlp/{n}", layer=i)
        for n in ("layer_norm1", "layer_norm2"):
            rules += copy(f"{s}.{n}.weight", f"{d}/{n}/weight", layer=i)
            rules += copy(f"{s}.{n}.bias", f"{d}/{n}/bias", layer=i)
    return rules
