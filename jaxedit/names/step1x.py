"""Name table of Step1X-Edit's `step1x-edit-i1258.safetensors` -> jaxedit `Step1XEdit` params.

The file is the BFL DiT (no `guidance_in`; `jaxedit.names.flux.bfl_rules`) plus the Qwen2 connector under
`connector.`. Our connector layout differs from the file's in one place: the fused `self_attn_qkv` weight
[3*D, D] becomes a `[D, 3, D]` kernel (q, k, v split along the second axis, heads contiguous), as for the
DiT's qkv.
"""

from __future__ import annotations

from jaxedit.configs import ConnectorConfig, FluxConfig
from jaxedit.names import Rule, copy, linear
from jaxedit.names.flux import bfl_rules


def connector_rules(cfg: ConnectorConfig, src: str = "connector", dst: str = "connector") -> list[Rule]:
    """S1X `Qwen2Connector` state dict (keys under `src.`) -> `Qwen2Connector` params (under `dst/`)."""
    h = cfg.hidden_size
    rules = copy(f"{src}.scale_factor", f"{dst}/scale_factor")
    rules += linear(f"{src}.global_proj_out", f"{dst}/global_proj_out")
    s, d = f"{src}.S", f"{dst}/S"
    rules += linear(f"{s}.input_embedder", f"{d}/input_embedder")
    rules += linear(f"{s}.t_embedder.mlp.0", f"{d}/t_embedder/mlp/0")
    rules += linear(f"{s}.t_embedder.mlp.2", f"{d}/t_embedder/mlp/2")
    rules += linear(f"{s}.c_embedder.linear_1", f"{d}/c_embedder/linear_1")
    rules += linear(f"{s}.c_embedder.linear_2", f"{d}/c_embedder/linear_2")
    blocks = f"{d}/individual_token_refiner/blocks"
    for i in range(cfg.depth):
        b = f"{s}.individual_token_refiner.blocks.{i}"
        for n in ("norm1", "norm2"):
            rules += copy(f"{b}.{n}.weight", f"{blocks}/{n}/scale", layer=i)
            rules += copy(f"{b}.{n}.bias", f"{blocks}/{n}/bias", layer=i)
        for j in range(3):  # fused rows (q | k | v), head-major inside each
            rows = slice(j * h, (j + 1) * h)
            rules += linear(
                f"{b}.self_attn_qkv", f"{blocks}/self_attn_qkv", layer=i, rows=rows, out_index=(j,), bias=cfg.qkv_bias
            )
        rules += linear(f"{b}.self_attn_proj", f"{blocks}/self_attn_proj", layer=i)
        rules += linear(f"{b}.mlp.fc1", f"{blocks}/mlp/fc1", layer=i)
        rules += linear(f"{b}.mlp.fc2", f"{blocks}/mlp/fc2", layer=i)
        rules += linear(f"{b}.adaLN_modulation.1", f"{blocks}/adaLN_modulation/1", layer=i)
    return rules


def step1x_rules(dit: FluxConfig, connector: ConnectorConfig) -> list[Rule]:
    """The whole Step1X-Edit file: BFL DiT names + `connector.*`."""
    return bfl_rules(dit) + connector_rules(connector)
