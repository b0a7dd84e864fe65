"""Name table of the Qwen-Image(-Edit 2509 / 2511) DiT: diffusers `QwenImageTransformer2DModel` -> jaxedit
`QwenImageTransformer` params (`jaxedit/models/qwen_image.py`).

Nearly the identity: every torch Linear becomes a Dense (weight transposed), every block's tensors land at
their layer of the stacked `transformer_blocks` parameters, and three torch containers lose a level
(`img_mod.1` -> `img_mod/lin`, `img_mlp.net.0.proj` / `img_mlp.net.2` -> `img_mlp/0` / `img_mlp/2`,
`attn.to_out.0` -> `attn/to_out_0`). Qwen-Image was released in diffusers' layout, and ComfyUI and LoRA
trainers use the same module names, so this one table also places every Qwen-Image LoRA.
"""

from __future__ import annotations

from jaxedit.configs import QwenImageConfig
from jaxedit.names import Rule, copy, linear

# diffusers name under `transformer_blocks.N.attn.` -> ours under `transformer_blocks/attn/`
ATTN_LINEARS = {
    "to_q": "to_q",
    "to_k": "to_k",
    "to_v": "to_v",
    "to_out.0": "to_out_0",
    "add_q_proj": "add_q_proj",
    "add_k_proj": "add_k_proj",
    "add_v_proj": "add_v_proj",
    "to_add_out": "to_add_out",
}
ATTN_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def diffusers_rules(cfg: QwenImageConfig) -> list[Rule]:
    """diffusers `QwenImageTransformer2DModel` (a `transformer/` folder) -> QwenImageTransformer params."""
    rules = linear("img_in", "img_in") + linear("txt_in", "txt_in") + copy("txt_norm.weight", "txt_norm/weight")
    for n in ("linear_1", "linear_2"):
        rules += linear(f"time_text_embed.timestep_embedder.{n}", f"time_text_embed/timestep_embedder/{n}")
    rules += linear("norm_out.linear", "norm_out/linear") + linear("proj_out", "proj_out")
    for i in range(cfg.num_layers):
        s, d = f"transformer_blocks.{i}", "transformer_blocks"
        for stream in ("img", "txt"):
            rules += linear(f"{s}.{stream}_mod.1", f"{d}/{stream}_mod/lin", layer=i)
            rules += linear(f"{s}.{stream}_mlp.net.0.proj", f"{d}/{stream}_mlp/0", layer=i)
            rules += linear(f"{s}.{stream}_mlp.net.2", f"{d}/{stream}_mlp/2", layer=i)
        for theirs, ours in ATTN_LINEARS.items():
            rules += linear(f"{s}.attn.{theirs}", f"{d}/attn/{ours}", layer=i)
        for n in ATTN_NORMS:
            rules += copy(f"{s}.attn.{n}.weight", f"{d}/attn/{n}/weight", layer=i)
    return rules


# layout name -> its table
LAYOUTS = {"diffusers": diffusers_rules}
