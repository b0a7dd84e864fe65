"""The Qwen-Image MMDiT in Flax Linen (diffusers `QwenImageTransformer2DModel`): the DiT of Qwen-Image-Edit
2509 and 2511.

60 double-stream blocks (separate image and text weights, joint attention over [text | image]), no
single-stream blocks, no pooled text vector: the modulation comes from the timestep alone. The text
tokens are Qwen2.5-VL hidden states, RMS-normalised (`txt_norm`) then projected (`txt_in`); a text mask
removes padded text tokens from the keys. RoPE has three axes (frame, height, width; `qwen_image_rope`).

Qwen-Image-Edit-2511 (`zero_cond_t`): the reference images' tokens are modulated with the embedding of
timestep 0 (the target's with the sample's timestep); the text stream and the output layer use the
sample's. Supported flags: `zero_cond_t`. Not supported (ValueError): `guidance_embeds` (broken in
diffusers, unused by the released models), `use_additional_t_cond` and `use_layer3d_rope` (Qwen-Image-Layered).

Parameter names are diffusers' (`transformer_blocks/attn/to_q`, `txt_norm/weight`, `norm_out/linear`, ...)
except where a torch container adds a level: `img_mod.1` -> `img_mod/lin` (`layers.Modulation`),
`img_mlp.net.0.proj` / `img_mlp.net.2` -> `img_mlp/0` / `img_mlp/2`, `attn.to_out.0` -> `attn/to_out_0`.
Block parameters are stacked along a leading layer axis (`transformer_blocks`) whether or not the layers
run under `nn.scan`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxedit.configs import QwenImageConfig
from jaxedit.models import qwen_image_rope as rope
from jaxedit.models.attention import dot_product_attention
from jaxedit.models.flux import Mlp, layer_range, stacked
from jaxedit.models.layers import (
    ACT,
    ACT_HEADS,
    Modulation,
    TwoLayerMLP,
    apply_rope,
    dense,
    layer_norm,
    modulate,
    ones,
    rms_normalize,
    sinusoid_freqs,
)
from jaxedit.parallel.sharding import constrain, param_init

Dtype = Any


EDIT_2509 = QwenImageConfig()
EDIT_2511 = QwenImageConfig(zero_cond_t=True)


class RMSNorm(nn.Module):
    """diffusers RMSNorm with a learned `weight`: normalised in float32, cast back, times the weight."""

    axis: str = "head_dim"  # the weight's logical axis name
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", param_init(ones, (self.axis,)), (x.shape[-1],), self.param_dtype)
        return rms_normalize(x.astype(self.dtype), self.eps) * w.astype(self.dtype)


class TimestepProjEmbeddings(nn.Module):
    """diffusers QwenTimestepProjEmbeddings: t [N] in [0, 1] -> [N, D]. The 256-wide sinusoid is
    [cos, sin](1000 * (t * freqs)) in float32 (that order of rounding), then linear_1 -> SiLU -> linear_2."""

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_N):
        freqs = jnp.asarray(sinusoid_freqs(128, 10000.0))
        args = (t_N.astype(self.dtype).astype(jnp.float32)[:, None] * freqs) * jnp.float32(1000.0)
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1).astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return TwoLayerMLP(self.hidden_size, ("linear_1", "linear_2"), name="timestep_embedder", **kw)(emb)


class JointAttention(nn.Module):
    """diffusers `Attention` + `QwenDoubleStreamAttnProcessor2_0`: per-stream q/k/v projections and q/k
    RMSNorms, RoPE, one attention over [text | image], per-stream output projections."""

    cfg: QwenImageConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        d, kw = self.cfg.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.to_q = dense(d, ("embed", "heads"), name="to_q", **kw)
        self.to_k = dense(d, ("embed", "heads"), name="to_k", **kw)
        self.to_v = dense(d, ("embed", "heads"), name="to_v", **kw)
        self.norm_q = RMSNorm(name="norm_q", **kw)
        self.norm_k = RMSNorm(name="norm_k", **kw)
        self.to_out_0 = dense(d, ("heads", "embed"), name="to_out_0", **kw)
        self.add_q_proj = dense(d, ("embed", "heads"), name="add_q_proj", **kw)
        self.add_k_proj = dense(d, ("embed", "heads"), name="add_k_proj", **kw)
        self.add_v_proj = dense(d, ("embed", "heads"), name="add_v_proj", **kw)
        self.norm_added_q = RMSNorm(name="norm_added_q", **kw)
        self.norm_added_k = RMSNorm(name="norm_added_k", **kw)
        self.to_add_out = dense(d, ("heads", "embed"), name="to_add_out", **kw)

    def heads(self, x_BLD, *projections):
        b, l, _ = x_BLD.shape
        return [constrain(p(x_BLD).reshape(b, l, self.cfg.num_attention_heads, -1), ACT_HEADS) for p in projections]

    def __call__(self, img_BLD, txt_BTD, rope_cs, key_seg_BS=None):
        """-> (image output [B, L, D], text output [B, T, D]); rope_cs: (cos, sin) of [text | image];
        key_seg_BS: segment ids of [text | image] keys (0 attended, -1 masked out) or None."""
        img_q, img_k, img_v = self.heads(img_BLD, self.to_q, self.to_k, self.to_v)
        txt_q, txt_k, txt_v = self.heads(txt_BTD, self.add_q_proj, self.add_k_proj, self.add_v_proj)
        img_q, img_k = self.norm_q(img_q), self.norm_k(img_k)
        txt_q, txt_k = self.norm_added_q(txt_q), self.norm_added_k(txt_k)
        cos, sin = rope_cs
        q = apply_rope(jnp.concatenate([txt_q, img_q], axis=1), cos, sin)
        k = apply_rope(jnp.concatenate([txt_k, img_k], axis=1), cos, sin)
        v = jnp.concatenate([txt_v, img_v], axis=1)
        seg = None if key_seg_BS is None else (jnp.zeros((q.shape[0], q.shape[1]), jnp.int32), key_seg_BS)
        out = dot_product_attention(q, k, v, impl=self.attention_impl, segment_ids=seg)
        out = out.reshape(*out.shape[:2], -1)
        lt = txt_BTD.shape[1]
        return self.to_out_0(out[:, lt:]), self.to_add_out(out[:, :lt])


def per_token(chunks, target_1L1):
    """Modulation chunks [B, 1, D] as they are, or with zero_cond_t chunks [2B, 1, D] (the sample's timestep,
    then timestep 0) -> [B, L, D]: the first half's on target tokens, the second half's on reference tokens."""
    if target_1L1 is None:
        return chunks
    b = chunks[0].shape[0] // 2
    return tuple(jnp.where(target_1L1, c[:b], c[b:]) for c in chunks)


class QwenImageBlock(nn.Module):
    """diffusers QwenImageTransformerBlock: AdaLN-modulated joint attention then MLP, per stream."""

    cfg: QwenImageConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    mlp_chunks: int = 1

    def setup(self):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.img_mod = Modulation(2, **kw)
        self.txt_mod = Modulation(2, **kw)
        self.attn = JointAttention(cfg, attention_impl=self.attention_impl, **kw)
        # diffusers' FeedForward (GELU-tanh, net.0.proj -> net.2) is BFL's MLP: Linear `0` -> GELU -> Linear `2`
        self.img_mlp = Mlp(cfg, chunks=self.mlp_chunks, **kw)
        self.txt_mlp = Mlp(cfg, chunks=self.mlp_chunks, **kw)

    def __call__(self, carry, vec, rope_cs, key_seg, target):
        """carry (img [B, L, D], txt [B, T, D]); vec [B, D] ([2B, D] with zero_cond_t); target [1, L, 1] bool
        (zero_cond_t: the target's tokens) or None. -> ((img, txt), None)."""
        img, txt = (checkpoint_name(constrain(x, ACT), "block_input") for x in carry)
        b = txt.shape[0]
        img1, img2 = (per_token(m, target) for m in self.img_mod(vec))
        txt1, txt2 = self.txt_mod(vec[:b])

        img_attn, txt_attn = self.attn(
            modulate(layer_norm(img), img1[0], img1[1]), modulate(layer_norm(txt), txt1[0], txt1[1]), rope_cs, key_seg
        )
        img = img + img1[2] * img_attn
        txt = txt + txt1[2] * txt_attn
        img = img + img2[2] * self.img_mlp(modulate(layer_norm(img), img2[0], img2[1]))
        txt = txt + txt2[2] * self.txt_mlp(modulate(layer_norm(txt), txt2[0], txt2[1]))
        return (img, txt), None


class AdaLayerNormContinuous(nn.Module):
    """diffusers AdaLayerNormContinuous (no affine): LayerNorm(x) * (1 + scale) + shift, (scale, shift) =
    `linear`(SiLU(vec)) in that order."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, vec_BD):
        d = x_BLD.shape[-1]
        lin = dense(2 * d, ("embed", "mod"), name="linear", dtype=self.dtype, param_dtype=self.param_dtype)
        scale, shift = jnp.split(lin(nn.silu(vec_BD))[:, None, :], 2, axis=-1)
        return modulate(layer_norm(x_BLD), shift, scale)


class QwenImageTransformer(nn.Module):
    """`apply({"params": p}, img, txt, txt_mask, timesteps, img_shapes)` -> [B, L, patch_size**2 * out_channels].

    img [B, L, in_channels]: the packed latent tokens of the target then each reference image, as laid out
    by `img_shapes` (static: a tuple of (frames, height, width) in tokens per image, the target first, the
    same for every sample: diffusers' per-sample list also uses only the first sample's for RoPE);
    txt [B, T, joint_attention_dim] (Qwen2.5-VL hidden states); txt_mask [B, T] (nonzero on valid tokens)
    or None (all valid); timesteps [B] in [0, 1] (the pipeline's `timestep / 1000`). The output covers every
    image token (the caller keeps the target's), in the compute dtype.
    """

    cfg: QwenImageConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    mlp_chunks: int = 1  # the blocks' MLPs on this many slices of the tokens (a smaller working set)

    def setup(self):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.time_text_embed = TimestepProjEmbeddings(cfg.hidden_size, **kw)
        self.txt_norm = RMSNorm(axis="in", **kw)
        self.img_in = dense(cfg.hidden_size, ("in", "embed"), name="img_in", **kw)
        self.txt_in = dense(cfg.hidden_size, ("in", "embed"), name="txt_in", **kw)
        self.transformer_blocks = stacked(
            QwenImageBlock,
            cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="transformer_blocks",
            in_axes=(nn.broadcast,) * 4,
            cfg=cfg,
            attention_impl=self.attention_impl,
            mlp_chunks=self.mlp_chunks,
            **kw,
        )
        self.norm_out = AdaLayerNormContinuous(**kw)
        self.proj_out = dense(cfg.out_features, ("embed", "in"), name="proj_out", **kw)

    def __call__(self, img, txt, txt_mask, timesteps, img_shapes: Sequence[Sequence[int]]):
        img, txt, vec, ctx = self.embed(img, txt, txt_mask, timesteps, img_shapes)
        (img, _), _ = self.transformer_blocks((img, txt), vec, *ctx)
        return self.finish(img, vec)

    def embed(self, img, txt, txt_mask, timesteps, img_shapes: Sequence[Sequence[int]]):
        """The call's inputs embedded for the blocks: (img [B, L, D], txt [B, T, D], vec [B, D] ([2B, D] with
        zero_cond_t), ctx = (RoPE (cos, sin), key segments [B, T + L] or None, target [1, L, 1] or None)), what the
        blocks and the split calls (`first_blocks`, `rest_blocks`, `finish`: step caching) take."""
        cfg = self.cfg
        img_shapes = rope.as_img_shapes(img_shapes)
        counts = rope.image_tokens(img_shapes)
        if img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img has {img.shape[-1]} features, config in_channels is {cfg.in_channels}")
        if img.shape[1] != sum(counts):
            raise ValueError(f"img has {img.shape[1]} tokens, img_shapes {img_shapes} lay out {sum(counts)}")
        if txt.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"txt has {txt.shape[-1]} features, config joint_attention_dim is {cfg.joint_attention_dim}"
            )
        b, t = txt.shape[:2]
        if txt_mask is not None and txt_mask.shape != (b, t):
            raise ValueError(f"txt_mask has shape {txt_mask.shape}, txt has {b} x {t} tokens")
        if cfg.zero_cond_t:  # [the sample's timesteps | zeros]: reference tokens are modulated with t = 0
            timesteps = jnp.concatenate([timesteps, jnp.zeros_like(timesteps)])
            target = jnp.asarray(np.arange(sum(counts)) < counts[0])[None, :, None]
        else:
            target = None
        vec = self.time_text_embed(timesteps)
        img = constrain(self.img_in(img), ACT)
        txt = constrain(self.txt_in(self.txt_norm(txt)), ACT)
        rope_cs = rope.rope_frequencies(rope.positions(img_shapes, t), cfg.axes_dims_rope, cfg.theta)
        key_seg = None
        if txt_mask is not None:
            key_seg = jnp.concatenate(
                [jnp.where(txt_mask.astype(bool), 0, -1), jnp.zeros((b, img.shape[1]), jnp.int32)], axis=1
            ).astype(jnp.int32)
        return img, txt, vec, (rope_cs, key_seg, target)

    def finish(self, hidden, vec):
        """The output layer on the image tokens' hidden states -> [B, L, patch_size**2 * out_channels]."""
        return self.proj_out(self.norm_out(hidden, vec[: hidden.shape[0]]))

    # -- the blocks in two parts, with the same parameters (step caching, `jaxedit.step_cache`): the blocks are
    # rest_blocks(*first_blocks(img, txt, vec, ctx), vec, ctx), the first n blocks, then the others

    def _block_slice(self, lo: int, hi: int):
        """Blocks lo..hi-1 as a callable on (img, txt), vec, ctx (`flux.layer_range` over the stacked parameters,
        with `transformer_blocks`' block arguments)."""
        block = QwenImageBlock(cfg=self.cfg, attention_impl=self.attention_impl, mlp_chunks=self.mlp_chunks,
                               dtype=self.dtype, param_dtype=self.param_dtype, parent=None)  # fmt: skip
        run = layer_range(block, self.variables["params"]["transformer_blocks"], lo, hi, scan=self.scan_layers)
        return lambda carry, vec, ctx: run(carry, vec, *ctx)

    def first_blocks(self, img, txt, vec, ctx, n: int = 1):
        """The first n blocks on embedded tokens (`embed`) -> (img, txt) after them."""
        if not 1 <= n < self.cfg.num_layers:
            raise ValueError(f"the first part is 1 to {self.cfg.num_layers - 1} blocks, got {n}")
        return self._block_slice(0, n)((img, txt), vec, ctx)

    def rest_blocks(self, img, txt, vec, ctx, n: int = 1):
        """The blocks after the first n -> the image tokens' hidden states [B, L, D] before `finish`."""
        return self._block_slice(n, self.cfg.num_layers)((img, txt), vec, ctx)[0]

    def first_modulated(self, img, vec, ctx):
        """The first block's modulated image input LayerNorm(img) (1 + scale) + shift of its first image
        modulation (with zero_cond_t: the references' tokens by timestep 0's) [B, L, D] (TeaCache's signal)."""
        params = jax.tree.map(lambda a: a[0], self.variables["params"]["transformer_blocks"]["img_mod"])
        (shift, scale, _), _ = Modulation(2, dtype=self.dtype, param_dtype=self.param_dtype, parent=None).apply(
            {"params": params}, vec
        )
        shift, scale = per_token((shift, scale), ctx[2])
        return modulate(layer_norm(img), shift, scale)


def example_inputs(
    cfg: QwenImageConfig, batch: int = 1, img_shapes: Sequence[Sequence[int]] = ((1, 1, 1),), txt_tokens: int = 1
) -> tuple:
    """Zero inputs of `QwenImageTransformer(cfg)` (img, txt, txt_mask, timesteps, img_shapes), e.g. for `init`."""
    img_shapes = rope.as_img_shapes(img_shapes)
    b, li = batch, sum(rope.image_tokens(img_shapes))
    return (
        jnp.zeros((b, li, cfg.in_channels)),
        jnp.zeros((b, txt_tokens, cfg.joint_attention_dim)),
        jnp.ones((b, txt_tokens), jnp.int32),
        jnp.zeros((b,)),
        img_shapes,
    )


def abstract_params(cfg: QwenImageConfig, param_dtype: Dtype = jnp.float32, *, boxed: bool = False):
    """The parameter tree of `QwenImageTransformer(cfg)` as ShapeDtypeStructs (nothing allocated).

    boxed=True keeps the logical-partitioning metadata (for sharding rules).
    """
    model = QwenImageTransformer(cfg, param_dtype=param_dtype)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(cfg)))["params"]
    return tree if boxed else nn.meta.unbox(tree)
