"""Name tables of the FLUX transformer: BFL layout (`flux1-*.safetensors`, also Step1X-Edit's DiT) and
diffusers layout (`FluxTransformer2DModel`) -> jaxedit `Flux` params.

Our names are BFL's but for three layout changes (jaxedit/models/flux.py): fused q/k/v kernels are
[D, 3, H*Dh] (torch row i*H*Dh + j is output (i, j)); single-block `linear1` is `linear1_qkv` | `linear1_mlp`
along the outputs and `linear2` is `linear2_attn` over `linear2_mlp` along the inputs. diffusers splits
BFL's fused q/k/v into to_q / to_k / to_v (and linear1's MLP rows into proj_mlp), and its norm_out.linear
is BFL's final_layer.adaLN_modulation.1 with its two halves swapped.
"""

from __future__ import annotations

from jaxedit.configs import FluxConfig
from jaxedit.names import Rule, copy, linear


def _qkv_parts(h: int):
    """Row slices of a fused [3*h, D] q/k/v weight and where each goes in our [D, 3, h] kernel."""
    return [(slice(i * h, (i + 1) * h), (i,)) for i in range(3)]


def bfl_rules(cfg: FluxConfig) -> list[Rule]:
    """BFL `flux1-*.safetensors` (also Step1X-Edit's DiT part) -> Flux params."""
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    rules = linear("img_in", "img_in") + linear("txt_in", "txt_in")
    embedders = ["time_in", "vector_in"] + (["guidance_in"] if cfg.guidance_embed else [])
    for e in embedders:
        rules += linear(f"{e}.in_layer", f"{e}/in_layer") + linear(f"{e}.out_layer", f"{e}/out_layer")
    rules += linear("final_layer.linear", "final_layer/linear")
    rules += linear("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation/1")

    for i in range(cfg.depth):
        s, d = f"double_blocks.{i}", "double_blocks"
        for stream in ("img", "txt"):
            rules += linear(f"{s}.{stream}_mod.lin", f"{d}/{stream}_mod/lin", layer=i)
            for rows, out in _qkv_parts(h):
                rules += linear(
                    f"{s}.{stream}_attn.qkv",
                    f"{d}/{stream}_attn/qkv",
                    layer=i,
                    rows=rows,
                    out_index=out,
                    bias=cfg.qkv_bias,
                )
            for n in ("query_norm", "key_norm"):
                rules += copy(f"{s}.{stream}_attn.norm.{n}.scale", f"{d}/{stream}_attn/norm/{n}/scale", layer=i)
            rules += linear(f"{s}.{stream}_attn.proj", f"{d}/{stream}_attn/proj", layer=i)
            rules += linear(f"{s}.{stream}_mlp.0", f"{d}/{stream}_mlp/0", layer=i)
            rules += linear(f"{s}.{stream}_mlp.2", f"{d}/{stream}_mlp/2", layer=i)

    for i in range(cfg.depth_single_blocks):
        s, d = f"single_blocks.{i}", "single_blocks"
        rules += linear(f"{s}.modulation.lin", f"{d}/modulation/lin", layer=i)
        for rows, out in _qkv_parts(h):
            rules += linear(f"{s}.linear1", f"{d}/linear1_qkv", layer=i, rows=rows, out_index=out, bias=cfg.qkv_bias)
        rules += linear(f"{s}.linear1", f"{d}/linear1_mlp", layer=i, rows=slice(3 * h, 3 * h + m))
        rules += linear(f"{s}.linear2", f"{d}/linear2_attn", layer=i, cols=slice(0, h))
        rules += linear(f"{s}.linear2", f"{d}/linear2_mlp", layer=i, cols=slice(h, h + m), bias=False)
        for n in ("query_norm", "key_norm"):
            rules += copy(f"{s}.norm.{n}.scale", f"{d}/norm/{n}/scale", layer=i)
    return rules


def diffusers_rules(cfg: FluxConfig) -> list[Rule]:
    """diffusers `FluxTransformer2DModel` -> Flux params."""
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    rules = linear("x_embedder", "img_in") + linear("context_embedder", "txt_in")
    embedders = [("timestep_embedder", "time_in"), ("text_embedder", "vector_in")]
    if cfg.guidance_embed:
        embedders.append(("guidance_embedder", "guidance_in"))
    for theirs, ours in embedders:
        rules += linear(f"time_text_embed.{theirs}.linear_1", f"{ours}/in_layer")
        rules += linear(f"time_text_embed.{theirs}.linear_2", f"{ours}/out_layer")
    rules += linear("proj_out", "final_layer/linear")
    # AdaLayerNormContinuous chunks (scale, shift); BFL's LastLayer chunks (shift, scale).
    rules += linear("norm_out.linear", "final_layer/adaLN_modulation/1", rows=slice(0, h), out_index=(slice(h, 2 * h),))
    rules += linear("norm_out.linear", "final_layer/adaLN_modulation/1", rows=slice(h, 2 * h), out_index=(slice(0, h),))

    for i in range(cfg.depth):
        s, d = f"transformer_blocks.{i}", "double_blocks"
        streams = {
            "img": dict(
                mod="norm1", qkv=("to_q", "to_k", "to_v"), norm=("norm_q", "norm_k"), proj="attn.to_out.0", ff="ff"
            ),
            "txt": dict(
                mod="norm1_context",
                qkv=("add_q_proj", "add_k_proj", "add_v_proj"),
                norm=("norm_added_q", "norm_added_k"),
                proj="attn.to_add_out",
                ff="ff_context",
            ),
        }
        for stream, n in streams.items():
            rules += linear(f"{s}.{n['mod']}.linear", f"{d}/{stream}_mod/lin", layer=i)
            for j, name in enumerate(n["qkv"]):
                rules += linear(
                    f"{s}.attn.{name}", f"{d}/{stream}_attn/qkv", layer=i, out_index=(j,), bias=cfg.qkv_bias
                )
            for name, ours in zip(n["norm"], ("query_norm", "key_norm")):
                rules += copy(f"{s}.attn.{name}.weight", f"{d}/{stream}_attn/norm/{ours}/scale", layer=i)
            rules += linear(f"{s}.{n['proj']}", f"{d}/{stream}_attn/proj", layer=i)
            rules += linear(f"{s}.{n['ff']}.net.0.proj", f"{d}/{stream}_mlp/0", layer=i)
            rules += linear(f"{s}.{n['ff']}.net.2", f"{d}/{stream}_mlp/2", layer=i)

    for i in range(cfg.depth_single_blocks):
        s, d = f"single_transformer_blocks.{i}", "single_blocks"
        rules += linear(f"{s}.norm.linear", f"{d}/modulation/lin", layer=i)
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            rules += linear(f"{s}.attn.{name}", f"{d}/linear1_qkv", layer=i, out_index=(j,), bias=cfg.qkv_bias)
        rules += linear(f"{s}.proj_mlp", f"{d}/linear1_mlp", layer=i)
        rules += linear(f"{s}.proj_out", f"{d}/linear2_attn", layer=i, cols=slice(0, h))
        rules += linear(f"{s}.proj_out", f"{d}/linear2_mlp", layer=i, cols=slice(h, h + m), bias=False)
        rules += copy(f"{s}.attn.norm_q.weight", f"{d}/norm/query_norm/scale", layer=i)
        rules += copy(f"{s}.attn.norm_k.weight", f"{d}/norm/key_norm/scale", layer=i)
    return rules


# layout name -> its table
LAYOUTS = {"bfl": bfl_rules, "diffusers": diffusers_rules}
