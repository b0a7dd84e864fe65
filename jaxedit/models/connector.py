"""Step1X-Edit's Qwen2 connector in Flax Linen (S1X `modules/connector_edit.py`).

Turns Qwen2.5-VL hidden states into the DiT's text tokens and pooled vector:

    t = 1000 * t                                   (inside the connector; callers pass t in [0, 1])
    y = global_proj_out(masked_mean(x) * (1 + scale_factor))               [B, pooled_dim]
    txt = S(x, t, mask)                                                     [B, L, hidden]

`S` (SingleTokenRefiner) adds c = t_embedder(sinusoid(t)) + c_embedder(masked_mean(x)) to
every refiner block as gates (no shift/scale), attending with the mask m_i & m_j whose
column 0 is forced on (a padded query still has one key). The math equals diffusers'
HunyuanVideoTokenRefiner. Parameter names follow the reference checkpoint (`connector.S.*`),
with the fused qkv kernel laid out `[D, 3, H*Dh]` as in `jaxedit.models.flux` and the
refiner blocks stacked along a leading layer axis (`individual_token_refiner/blocks`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxedit.configs import ConnectorConfig
from jaxedit.models.attention import dot_product_attention
from jaxedit.models.flux import stacked
from jaxedit.models.layers import (
    ACT,
    ACT_HEADS,
    ACT_MLP,
    TwoLayerMLP,
    dense,
    layer_norm,
    ones,
    timestep_embedding,
    zeros,
)
from jaxedit.parallel.sharding import constrain, param_init

Dtype = Any


def masked_mean(x_BLD: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """Mean over the valid tokens (mask != 0), [B, D]; summed in float32, cast back to x's dtype."""
    m = (jnp.asarray(mask_BL) != 0).astype(jnp.float32)[..., None]
    return ((x_BLD.astype(jnp.float32) * m).sum(1) / m.sum(1)).astype(x_BLD.dtype)


def refiner_mask(mask_BL: jax.Array) -> jax.Array:
    """Boolean self-attention mask [B, 1, L, L]: query i attends key j iff both are valid,
    and every query attends key 0 (rows of padded queries are never empty)."""
    valid = jnp.asarray(mask_BL) != 0
    m = valid[:, None, :, None] & valid[:, None, None, :]
    return m.at[..., 0].set(True)


class AffineLayerNorm(nn.Module):
    """LayerNorm with learned `scale` and `bias` (torch `weight`, `bias`), statistics in float32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", param_init(ones, ("embed",)), (d,), self.param_dtype)
        bias = self.param("bias", param_init(zeros, ("embed",)), (d,), self.param_dtype)
        return layer_norm(x.astype(self.dtype), self.eps) * scale.astype(self.dtype) + bias.astype(self.dtype)


class RefinerMlp(nn.Module):
    """fc1 -> SiLU -> fc2 (S1X MLP with act_type silu)."""

    cfg: ConnectorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(dense(self.cfg.mlp_hidden_dim, ("embed", "mlp"), name="fc1", **kw)(x), ACT_MLP)
        return dense(self.cfg.hidden_size, ("mlp", "embed"), name="fc2", **kw)(nn.silu(x))


class _GateModulation(nn.Module):
    """SiLU -> Linear named `1` (the reference's nn.Sequential): (gate_msa, gate_mlp), each [B, 1, D]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c_BD):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        lin = dense(2 * self.features, ("embed", "mod"), name="1", zero_init=True, **kw)
        gate_msa, gate_mlp = jnp.split(lin(nn.silu(c_BD))[:, None, :], 2, axis=-1)
        return gate_msa, gate_mlp


class IndividualTokenRefinerBlock(nn.Module):
    """x += g_msa * proj(attn(qkv(LN(x)), mask)); x += g_mlp * mlp(LN(x)); gates from c."""

    cfg: ConnectorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x_BLD, c_BD, mask_B1LL):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, l, _ = x_BLD.shape
        x_BLD = constrain(x_BLD, ACT)
        gate_msa, gate_mlp = _GateModulation(cfg.hidden_size, name="adaLN_modulation", **kw)(c_BD)

        qkv = dense((3, cfg.hidden_size), ("embed", "qkv", "heads"), name="self_attn_qkv", use_bias=cfg.qkv_bias, **kw)
        qkv = qkv(AffineLayerNorm(name="norm1", **kw)(x_BLD)).reshape(b, l, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = (constrain(qkv[:, :, i], ACT_HEADS) for i in range(3))
        attn = dot_product_attention(q, k, v, mask_BHLS=mask_B1LL, impl=self.attention_impl).reshape(b, l, -1)
        x_BLD = x_BLD + gate_msa * dense(cfg.hidden_size, ("heads", "embed"), name="self_attn_proj", **kw)(attn)

        mlp = RefinerMlp(cfg, name="mlp", **kw)(AffineLayerNorm(name="norm2", **kw)(x_BLD))
        return x_BLD + gate_mlp * mlp, None


class IndividualTokenRefiner(nn.Module):
    """`depth` refiner blocks (stacked parameters, `blocks`) under the padded-token mask."""

    cfg: ConnectorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"

    def setup(self):
        self.blocks = stacked(
            IndividualTokenRefinerBlock,
            self.cfg.depth,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="blocks",
            cfg=self.cfg,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def __call__(self, x_BLD, c_BD, mask_BL):
        x_BLD, _ = self.blocks(x_BLD, c_BD, refiner_mask(mask_BL))
        return x_BLD


class _TEmbedder(nn.Module):
    """S1X TimestepEmbedder's weights: `mlp` = Linear(256, D) -> SiLU -> Linear(D, D)."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb_B256):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return TwoLayerMLP(self.hidden_size, ("0", "2"), name="mlp", **kw)(t_emb_B256)


class SingleTokenRefiner(nn.Module):
    """S1X SingleTokenRefiner: x [B, L, in], t [B] ALREADY x1000, mask [B, L] -> [B, L, hidden]."""

    cfg: ConnectorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x_BLD, t_B, mask_BL):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # the sinusoid takes t as given: the connector has already scaled it by 1000
        t_emb = timestep_embedding(t_B, 256, time_factor=1.0).astype(self.dtype)
        c_BD = _TEmbedder(cfg.hidden_size, name="t_embedder", **kw)(t_emb)
        c_BD = c_BD + TwoLayerMLP(cfg.hidden_size, ("linear_1", "linear_2"), name="c_embedder", **kw)(
            masked_mean(x_BLD, mask_BL)
        )
        x = constrain(dense(cfg.hidden_size, ("in", "embed"), name="input_embedder", **kw)(x_BLD), ACT)
        refiner = IndividualTokenRefiner(
            cfg,
            name="individual_token_refiner",
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            **kw,
        )
        return refiner(x, c_BD, mask_BL)


class Qwen2Connector(nn.Module):
    """`apply({"params": p}, x [B, L, in], t [B] in [0, 1], mask [B, L])` -> (txt [B, L, hidden], y [B, pooled]).

    mask: 1 (or True) on valid tokens, 0 on padding; every row needs one valid token.
    """

    cfg: ConnectorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x_BLD, t_B, mask_BL):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if x_BLD.shape[-1] != cfg.in_channels:
            raise ValueError(f"connector input has {x_BLD.shape[-1]} features, config in_channels is {cfg.in_channels}")
        x_BLD = x_BLD.astype(self.dtype)
        # S1X multiplies by 1000 here, in t's dtype (the model dtype at inference)
        t_B = t_B.astype(self.dtype) * 1000
        scale_factor = self.param("scale_factor", param_init(zeros, (None,)), (1,), self.param_dtype)
        pooled = masked_mean(x_BLD, mask_BL) * (1 + scale_factor.astype(self.dtype))
        y = dense(cfg.pooled_dim, ("in", "embed"), name="global_proj_out", **kw)(pooled)
        txt = SingleTokenRefiner(
            cfg,
            name="S",
            scan_layers=self.scan_layers,
            remat_policy=self.remat_policy,
            attention_impl=self.attention_impl,
            **kw,
        )(x_BLD, t_B, mask_BL)
        return txt, y
