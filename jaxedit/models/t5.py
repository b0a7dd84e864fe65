"""The T5 v1.1 encoder in Flax Linen (transformers `T5EncoderModel`, gated-GELU FFN).

Parameter names follow the transformers checkpoint without the `encoder.` prefix
(`shared`, `block/layer_0/SelfAttention/q`, `block/layer_1/DenseReluDense/wi_0`,
`final_layer_norm`). Block parameters are stacked along a leading layer axis (`block`);
the relative position bias table, which the checkpoint keeps in layer 0 only and every
layer shares, is the separate top-level `relative_attention_bias`.

Precision: transformers keeps `wo` in float32 for float16 loads (`_keep_in_fp32_modules`)
and clamps inf, because T5 v1.1 FFN activations overflow float16. bfloat16 has float32's
range, so nothing overflows there; what is left is rounding. We keep the float32 islands
anyway, at little cost: the residual stream is float32 (the embedding output too), RMS
statistics, the position bias, attention logits and softmax are float32, and the FFN output
projection `wo` runs in float32. Other matmuls use the compute dtype; the output has it.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.configs import T5Config
from jaxedit.models.attention import dot_product_attention
from jaxedit.models.flux import stacked
from jaxedit.models.layers import ACT, ACT_HEADS, ACT_MLP, dense
from jaxedit.parallel.sharding import constrain, param_init

Dtype = Any


embed_init = nn.initializers.normal(stddev=1.0)


def relative_position_buckets(
    q_len: int, k_len: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True
) -> np.ndarray:
    """Bucket [q_len, k_len] (int32) of each relative position k - q, as transformers'
    `T5Attention._relative_position_bucket` computes it (same float32 rounding of the log)."""
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):  # log(0) at rel 0 is discarded by `is_small`
        scaled = (
            np.log(rel.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def t5_rms_norm(x, weight, eps: float, dtype):
    """T5LayerNorm: x / rms(x) in float32 (no mean, no bias), cast to `dtype`, times weight."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps)).astype(dtype) * weight.astype(dtype)


class T5LayerNorm(nn.Module):
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", param_init(nn.initializers.ones_init(), ("embed",)), (x.shape[-1],), self.param_dtype)
        return t5_rms_norm(x, w, self.eps, self.dtype)


class T5SelfAttention(nn.Module):
    """q, k, v, o projections without bias; softmax(q k^T + bias) v (no 1/sqrt(d) scaling)."""

    cfg: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, bias_1HLL, mask_B11L):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        b, l, _ = x_BLD.shape
        inner = cfg.num_heads * cfg.d_kv
        q, k, v = (
            constrain(
                dense(inner, ("embed", "heads"), name=n, **kw)(x_BLD).reshape(b, l, cfg.num_heads, cfg.d_kv), ACT_HEADS
            )
            for n in ("q", "k", "v")
        )
        out = dot_product_attention(q, k, v, bias_BHLS=bias_1HLL, mask_BHLS=mask_B11L, scale=1.0)
        return dense(cfg.d_model, ("heads", "embed"), name="o", **kw)(out.reshape(b, l, inner))


class T5DenseGatedActDense(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x); `wo` runs in float32 (transformers' float16 island)."""

    cfg: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD):
        cfg, kw = self.cfg, dict(param_dtype=self.param_dtype, use_bias=False)
        gate = dense(cfg.d_ff, ("embed", "mlp"), name="wi_0", dtype=self.dtype, **kw)(x_BLD)
        lin = dense(cfg.d_ff, ("embed", "mlp"), name="wi_1", dtype=self.dtype, **kw)(x_BLD)
        h = constrain(nn.gelu(gate, approximate=True) * lin, ACT_MLP)
        return dense(cfg.d_model, ("mlp", "embed"), name="wo", dtype=jnp.float32, **kw)(h.astype(jnp.float32))


class T5LayerSelfAttention(nn.Module):
    cfg: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, bias_1HLL, mask_B11L):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = T5LayerNorm(self.cfg.layer_norm_epsilon, name="layer_norm", **kw)(x_BLD)
        return x_BLD + T5SelfAttention(self.cfg, name="SelfAttention", **kw)(h, bias_1HLL, mask_B11L)


class T5LayerFF(nn.Module):
    cfg: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = T5LayerNorm(self.cfg.layer_norm_epsilon, name="layer_norm", **kw)(x_BLD)
        return x_BLD + T5DenseGatedActDense(self.cfg, name="DenseReluDense", **kw)(h)


class T5Block(nn.Module):
    """Self-attention sub-layer then FFN sub-layer, each pre-norm + residual (float32 carry)."""

    cfg: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, bias_1HLL, mask_B11L):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_BLD = constrain(x_BLD, ACT)
        x_BLD = T5LayerSelfAttention(self.cfg, name="layer_0", **kw)(x_BLD, bias_1HLL, mask_B11L)
        x_BLD = T5LayerFF(self.cfg, name="layer_1", **kw)(x_BLD)
        return x_BLD.astype(jnp.float32), None


class T5Encoder(nn.Module):
    """`apply({"params": p}, input_ids [B, L], attention_mask [B, L] | None)` -> hidden [B, L, d_model].

    FLUX passes no attention mask (prompts padded to max_length, every token attended).
    """

    cfg: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> jax.Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, l = input_ids_BL.shape
        shared = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=jnp.float32,  # the residual stream is float32 from the start
            param_dtype=self.param_dtype,
            embedding_init=param_init(embed_init, ("vocab", "embed")),
            name="shared",
        )
        x = shared(input_ids_BL)

        table = self.param(
            "relative_attention_bias",
            param_init(embed_init, (None, "heads")),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            self.param_dtype,
        )
        buckets = relative_position_buckets(
            l, l, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # [L, L, H]
        bias = bias.transpose(2, 0, 1)[None]  # [1, H, L, L]
        mask = None if attention_mask_BL is None else attention_mask_BL.astype(bool)[:, None, None, :]

        blocks = stacked(
            T5Block, cfg.num_layers, scan=self.scan_layers, remat_policy=self.remat_policy, name="block", cfg=cfg, **kw
        )
        x, _ = blocks(x, bias, mask)
        return T5LayerNorm(cfg.layer_norm_epsilon, name="final_layer_norm", **kw)(x)


def abstract_params(cfg: T5Config, param_dtype: Dtype = jnp.float32, *, boxed: bool = False):
    """The parameter tree of `T5Encoder(cfg)` as ShapeDtypeStructs (nothing allocated)."""
    model = T5Encoder(cfg, param_dtype=param_dtype)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    return tree if boxed else nn.meta.unbox(tree)
