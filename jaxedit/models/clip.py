"""The CLIP text tower in Flax Linen (transformers `CLIPTextModel`; FLUX uses CLIP ViT-L/14's).

Parameter names follow the transformers checkpoint (`embeddings/token_embedding`,
`layers/self_attn/q_proj`, `layers/mlp/fc1`, `final_layer_norm`) with the
`encoder.layers.N` blocks stacked along a leading layer axis (`layers`).
Pre-LN blocks, causal self-attention scaled by 1/sqrt(head_dim), quick-GELU MLP
(x * sigmoid(1.702 x), CLIP-L's `hidden_act`), LayerNorm with affine weights whose
statistics are float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxedit.configs import CLIPTextConfig
from jaxedit.models.attention import dot_product_attention
from jaxedit.models.flux import stacked
from jaxedit.models.layers import ACT, ACT_HEADS, ACT_MLP, dense
from jaxedit.parallel.sharding import constrain, param_init

Dtype = Any


embed_init = nn.initializers.normal(stddev=0.02)


class LayerNorm(nn.Module):
    """torch-style LayerNorm (`weight`, `bias`): statistics and affine in float32, cast to dtype."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        w = self.param("weight", param_init(nn.initializers.ones_init(), ("embed",)), (d,), self.param_dtype)
        b = self.param("bias", param_init(nn.initializers.zeros_init(), ("embed",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * w.astype(jnp.float32) + b.astype(jnp.float32)
        return y.astype(self.dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """q/k/v/out projections with bias; softmax(q k^T / sqrt(head_dim) [masked]) v."""

    cfg: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, mask):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, l, d = x_BLD.shape
        shape = (b, l, cfg.num_heads, d // cfg.num_heads)
        q, k, v = (
            constrain(dense(d, ("embed", "heads"), name=n, **kw)(x_BLD).reshape(shape), ACT_HEADS)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        out = dot_product_attention(q, k, v, mask_BHLS=mask).reshape(b, l, d)
        return dense(d, ("heads", "embed"), name="out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    cfg: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = constrain(dense(self.cfg.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x_BLD), ACT_MLP)
        return dense(x_BLD.shape[-1], ("mlp", "embed"), name="fc2", **kw)(quick_gelu(h))


class CLIPEncoderLayer(nn.Module):
    """x + self_attn(LN1(x)), then + mlp(LN2(x)); the mask is causal [& key padding]."""

    cfg: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, causal_11LL, keys_B11L):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_BLD = constrain(x_BLD, ACT)
        mask = causal_11LL if keys_B11L is None else causal_11LL & keys_B11L
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1", **kw)(x_BLD)
        x_BLD = x_BLD + CLIPAttention(cfg, name="self_attn", **kw)(h, mask)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2", **kw)(x_BLD)
        return x_BLD + CLIPMLP(cfg, name="mlp", **kw)(h), None


class CLIPTextEmbeddings(nn.Module):
    cfg: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_BL):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        l = input_ids_BL.shape[1]
        if l > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {l} tokens is longer than max_position_embeddings {cfg.max_position_embeddings}"
            )
        tok = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=param_init(embed_init, ("vocab", "embed")),
            name="token_embedding",
            **kw,
        )
        pos = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=param_init(embed_init, (None, "embed")),
            name="position_embedding",
            **kw,
        )
        return tok(input_ids_BL) + pos(jnp.arange(l))[None]


def pooled_index(input_ids_BL: jax.Array, eos_token_id: int) -> jax.Array:
    """Position [B] of the pooled token, as transformers' CLIPTextModel picks it: with the
    legacy eos_token_id == 2, argmax(input_ids) (the EOS id is the largest); otherwise the
    first occurrence of eos_token_id."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids_BL, axis=-1)
    return jnp.argmax((input_ids_BL == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModel(nn.Module):
    """`apply({"params": p}, input_ids [B, L], attention_mask [B, L] | None)`
    -> (last_hidden_state [B, L, D], pooled [B, D]) in the compute dtype.

    FLUX passes no attention mask (prompts padded to 77 tokens; the causal mask alone).
    """

    cfg: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, l = input_ids_BL.shape
        x = CLIPTextEmbeddings(cfg, name="embeddings", **kw)(input_ids_BL)
        causal = jnp.tril(jnp.ones((l, l), bool))[None, None]
        keys = None if attention_mask_BL is None else attention_mask_BL.astype(bool)[:, None, None, :]
        layers = stacked(
            CLIPEncoderLayer,
            cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="layers",
            cfg=cfg,
            **kw,
        )
        x, _ = layers(x, causal, keys)
        x = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        pooled = x[jnp.arange(b), pooled_index(input_ids_BL, cfg.eos_token_id)]
        return x, pooled


def abstract_params(cfg: CLIPTextConfig, param_dtype: Dtype = jnp.float32, *, boxed: bool = False):
    """The parameter tree of `CLIPTextModel(cfg)` as ShapeDtypeStructs (nothing allocated)."""
    model = CLIPTextModel(cfg, param_dtype=param_dtype)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    return tree if boxed else nn.meta.unbox(tree)
