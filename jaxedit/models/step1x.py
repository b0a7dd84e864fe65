"""Step1X-Edit in Flax Linen (S1X `modules/model_edit.py`): the FLUX DiT fed by the Qwen2 connector.

`Step1XEdit` is `Flux` (same blocks, same parameter layout; no `guidance_in`) plus the
`connector` subtree of `jaxedit.models.connector.Qwen2Connector`. The attention mask
only acts inside the connector: the DiT blocks attend over every (also padded) text
token, as the reference does.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxedit.configs import ConnectorConfig, FluxConfig
from jaxedit.models.connector import Qwen2Connector
from jaxedit.models.flux import Dtype, Flux


class Step1XEdit(Flux):
    """`apply({"params": p}, img, img_ids, llm_embeds, llm_mask, timesteps)` -> [B, Li, out_channels].

    img [B, Li, in_channels] (target then reference tokens), img_ids [B, Li, 3],
    llm_embeds [B, L, connector in_channels] (Qwen2.5-VL last hidden states),
    llm_mask [B, L] (1 on valid tokens), timesteps [B] in [0, 1] (the DiT's time embedding
    and the connector both take it; the connector scales it by 1000 itself).
    Text ids are zeros. Build with `Step1XEdit(cfg, connector_cfg=...)`.
    """

    connector_cfg: ConnectorConfig = dataclasses.field(kw_only=True)

    def setup(self):
        cfg, ccfg = self.cfg, self.connector_cfg
        if cfg.guidance_embed:
            raise ValueError("Step1X-Edit has no guidance_in: use a FluxConfig with guidance_embed=False")
        if ccfg.hidden_size != cfg.context_in_dim or ccfg.pooled_dim != cfg.vec_in_dim:
            raise ValueError(
                f"connector outputs ({ccfg.hidden_size} per token, {ccfg.pooled_dim} pooled) do not match the "
                f"DiT's context_in_dim {cfg.context_in_dim} / vec_in_dim {cfg.vec_in_dim}"
            )
        super().setup()
        self.connector = Qwen2Connector(
            ccfg,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
        )

    def __call__(self, img, img_ids, llm_embeds, llm_mask, timesteps):
        return self.run_blocks(*self.embed(img, img_ids, llm_embeds, llm_mask, timesteps))

    def embed(self, img, img_ids, llm_embeds, llm_mask, timesteps):
        """The connector, then `Flux.embed`: (img, txt, vec, ids) for the blocks."""
        txt, y = self.connector(llm_embeds, timesteps, llm_mask)
        b, l = txt.shape[:2]
        txt_ids = jnp.zeros((b, l, img_ids.shape[-1]), img_ids.dtype)
        return super().embed(img, img_ids, txt, txt_ids, timesteps, y)


def example_inputs(
    cfg: FluxConfig, connector_cfg: ConnectorConfig, batch: int = 1, img_tokens: int = 1, llm_tokens: int = 2
) -> tuple:
    """Inputs of `Step1XEdit` (img, img_ids, llm_embeds, llm_mask, timesteps): zeros, every LLM token valid."""
    b = batch
    return (
        jnp.zeros((b, img_tokens, cfg.in_channels)),
        jnp.zeros((b, img_tokens, 3)),
        jnp.zeros((b, llm_tokens, connector_cfg.in_channels)),
        jnp.ones((b, llm_tokens), jnp.int32),
        jnp.zeros((b,)),
    )


def abstract_params(
    cfg: FluxConfig, connector_cfg: ConnectorConfig, param_dtype: Dtype = jnp.float32, *, boxed: bool = False
):
    """The parameter tree of `Step1XEdit(cfg, connector_cfg=...)` as ShapeDtypeStructs (nothing allocated).

    boxed=True keeps the logical-partitioning metadata (for sharding rules).
    """
    model = Step1XEdit(cfg, param_dtype=param_dtype, connector_cfg=connector_cfg)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(cfg, connector_cfg)))["params"]
    return tree if boxed else nn.meta.unbox(tree)
