"""The FLUX.1 MMDiT in Flax Linen (BFL `flux/model.py`, `flux/modules/layers.py`).

Parameter names follow the BFL checkpoint (`img_in`, `double_blocks.img_attn.qkv`, ...)
with three deliberate layout changes that keep heads contiguous for tensor
parallelism (the converter handles them):
  - fused q/k/v kernels are `[D, 3, H*Dh]` (BFL: one `[3*H*Dh, D]` weight);
  - single-block `linear1` is split into `linear1_qkv` and `linear1_mlp`;
  - single-block `linear2` is split into `linear2_attn` (with the bias) and `linear2_mlp`.
Block parameters are stacked along a leading layer axis (`double_blocks`, `single_blocks`)
whether or not the layers run under `nn.scan`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxedit.configs import FluxConfig
from jaxedit.models.attention import dot_product_attention
from jaxedit.models.layers import (
    ACT,
    ACT_HEADS,
    ACT_MLP,
    Modulation,
    QKNorm,
    TwoLayerMLP,
    apply_rope,
    dense,
    layer_norm,
    modulate,
    rope_frequencies,
    timestep_embedding,
)
from jaxedit.parallel.sharding import constrain

Dtype = Any

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # full remat with each block's input kept in host memory (pinned) instead of on the accelerator
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=["block_input"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


class _BlockBase(nn.Module):
    cfg: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    mlp_chunks: int = 1  # run the MLPs on this many slices of the tokens (`token_chunked`)

    @property
    def kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def attend(self, q, k, v, rope):
        """RoPE on q, k then attention: [B, L, H, Dh] -> [B, L, H*Dh]."""
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = dot_product_attention(q, k, v, impl=self.attention_impl)
        return out.reshape(*out.shape[:2], -1)


class SelfAttention(nn.Module):
    """Fused qkv projection + QK RMSNorm + output projection (BFL SelfAttention)."""

    cfg: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.qkv = dense((3, cfg.hidden_size), ("embed", "qkv", "heads"), name="qkv", use_bias=cfg.qkv_bias, **kw)
        self.norm = QKNorm(**kw)
        self.proj = dense(cfg.hidden_size, ("heads", "embed"), name="proj", **kw)

    def qkv_heads(self, x_BLD):
        """x -> normed q, k and v, each [B, L, H, Dh]."""
        b, l, _ = x_BLD.shape
        heads = (self.cfg.num_heads, self.cfg.head_dim)
        q, k, v = (constrain(t.reshape(b, l, *heads), ACT_HEADS) for t in self.qkv(x_BLD, split=True))
        q, k = self.norm(q, k)
        return q, k, v

    def __call__(self, x_BLD):  # only used to create parameters in isolation
        return self.proj(self.qkv_heads(x_BLD)[2].reshape(x_BLD.shape))


def token_chunked(fn, module: nn.Module, x_BLD: jax.Array, chunks: int) -> jax.Array:
    """fn(module, x) on `chunks` slices of x along the tokens, one after another (a lifted `nn.scan`, the
    module's parameters broadcast, each slice rematerialised), so only one slice's intermediates are alive
    at a time: a per-token function gives the same result as on the whole of x."""
    if chunks <= 1:
        return fn(module, x_BLD)
    b, l, d = x_BLD.shape
    pad = -l % chunks
    x = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0))) if pad else x_BLD
    x_CBld = x.reshape(b, chunks, (l + pad) // chunks, d).swapaxes(0, 1)
    body = nn.remat(lambda mdl, carry, xs: (carry, fn(mdl, xs)), prevent_cse=False)
    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, length=chunks)
    _, y = scan(module, None, x_CBld)
    return y.swapaxes(0, 1).reshape(b, l + pad, -1)[:, :l]


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear with BFL's Sequential names `0` and `2`; `chunks` > 1 runs it on
    slices of the tokens (`token_chunked`: the same result, a smaller working set)."""

    cfg: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    chunks: int = 1

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc_in = dense(self.cfg.mlp_hidden_dim, ("embed", "mlp"), name="0", **kw)
        self.fc_out = dense(self.cfg.hidden_size, ("mlp", "embed"), name="2", **kw)

    def apply_mlp(self, x):
        return self.fc_out(nn.gelu(constrain(self.fc_in(x), ACT_MLP), approximate=True))

    def __call__(self, x):
        return token_chunked(type(self).apply_mlp, self, x, self.chunks)


class DoubleStreamBlock(_BlockBase):
    """Separate weights for image and text tokens, joint attention over [txt | img]."""

    def setup(self):
        cfg, kw = self.cfg, self.kw
        self.img_mod = Modulation(2, **kw)
        self.img_attn = SelfAttention(cfg, **kw)
        self.img_mlp = Mlp(cfg, chunks=self.mlp_chunks, **kw)
        self.txt_mod = Modulation(2, **kw)
        self.txt_attn = SelfAttention(cfg, **kw)
        self.txt_mlp = Mlp(cfg, chunks=self.mlp_chunks, **kw)

    def __call__(self, carry, vec_BD, rope):
        img, txt = (checkpoint_name(constrain(x, ACT), "block_input") for x in carry)
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec_BD)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec_BD)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(layer_norm(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(layer_norm(txt), txt_shift1, txt_scale1))
        attn = self.attend(
            jnp.concatenate([txt_q, img_q], axis=1),
            jnp.concatenate([txt_k, img_k], axis=1),
            jnp.concatenate([txt_v, img_v], axis=1),
            rope,
        )
        lt = txt.shape[1]
        txt_attn, img_attn = attn[:, :lt], attn[:, lt:]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(layer_norm(img), img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(layer_norm(txt), txt_shift2, txt_scale2))
        return (img, txt), None


class SingleStreamBlock(_BlockBase):
    """Parallel attention + MLP over the joint sequence (BFL SingleStreamBlock)."""

    def setup(self):
        cfg, kw = self.cfg, self.kw
        self.modulation = Modulation(1, **kw)
        self.linear1_qkv = dense((3, cfg.hidden_size), ("embed", "qkv", "heads"), name="linear1_qkv",
                                 use_bias=cfg.qkv_bias, **kw)  # fmt: skip
        self.linear1_mlp = dense(cfg.mlp_hidden_dim, ("embed", "mlp"), name="linear1_mlp", **kw)
        self.norm = QKNorm(**kw)
        self.linear2_attn = dense(cfg.hidden_size, ("heads", "embed"), name="linear2_attn", **kw)
        self.linear2_mlp = dense(cfg.hidden_size, ("mlp", "embed"), name="linear2_mlp", use_bias=False, **kw)

    def mlp(self, x_mod):
        """The MLP half of the block, linear2's share included: [B, L, D] -> [B, L, D]."""
        return self.linear2_mlp(nn.gelu(constrain(self.linear1_mlp(x_mod), ACT_MLP), approximate=True))

    def __call__(self, x_BLD, vec_BD, rope):
        cfg = self.cfg
        b, l, _ = x_BLD.shape
        x_BLD = checkpoint_name(constrain(x_BLD, ACT), "block_input")
        ((shift, scale, gate),) = self.modulation(vec_BD)
        x_mod = modulate(layer_norm(x_BLD), shift, scale)

        heads = (cfg.num_heads, cfg.head_dim)
        q, k, v = (constrain(t.reshape(b, l, *heads), ACT_HEADS) for t in self.linear1_qkv(x_mod, split=True))
        q, k = self.norm(q, k)
        out = self.linear2_attn(self.attend(q, k, v, rope))
        out = out + token_chunked(type(self).mlp, self, x_mod, self.mlp_chunks)
        return x_BLD + gate * out, None


class _AdaLNModulation(nn.Module):
    """SiLU -> Linear, with the Linear named `1` as in BFL's nn.Sequential."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vec_BD):
        lin = dense(
            self.features, ("embed", "mod"), name="1", zero_init=True, dtype=self.dtype, param_dtype=self.param_dtype
        )
        return lin(nn.silu(vec_BD))


class LastLayer(nn.Module):
    """adaLN (shift, scale) + Linear to patch channels (BFL LastLayer)."""

    cfg: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD, vec_BD):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.cfg.hidden_size
        shift, scale = jnp.split(_AdaLNModulation(2 * d, name="adaLN_modulation", **kw)(vec_BD)[:, None, :], 2, axis=-1)
        x = modulate(layer_norm(x_BLD), shift, scale)
        return dense(self.cfg.out_channels, ("embed", "in"), name="linear", zero_init=True, **kw)(x)


def stacked(block_cls, length: int, *, scan: bool, remat_policy: str, name: str, in_axes=None, **kw):
    """`length` copies of `block_cls` with parameters stacked on a leading "layers" axis.

    in_axes: how the block's arguments after the carry are scanned (default: two broadcast ones;
    0 = a per-layer value with a leading layer axis).

    scan=True runs them under `nn.scan` (one compiled block body); scan=False unrolls the
    same loop (`unroll=length`), which is a plain sequence of blocks in the compiled
    program but keeps the identical stacked parameter layout.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
    if remat_policy != "none":
        block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    return nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast) if in_axes is None else in_axes,
        length=length,
        unroll=1 if scan else length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(name=name, **kw)


def layer_range(block: nn.Module, params, lo: int, hi: int, *, scan: bool):
    """Layers lo..hi-1 of a stacked parameter tree (a leading layer axis, as `stacked` keeps it) run by `block` (one
    layer, unbound; it returns (carry, _) as under `stacked`): (carry, *args) -> carry. Each layer's parameters are
    read where they lie, by a dynamic index inside a `lax.scan` over the layer numbers (as `nn.scan` reads its
    stack): slicing the stack instead would make the program copy it, most of the weights for the blocks after the
    first. scan=False unrolls the same loop."""

    def run(carry, *args):
        def body(c, i):
            p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), params)
            return block.apply({"params": p}, c, *args)[0], None

        return jax.lax.scan(body, carry, jnp.arange(lo, hi), unroll=1 if scan else hi - lo)[0]

    return run


class Flux(nn.Module):
    """FLUX.1 transformer: `apply({"params": p}, img, img_ids, txt, txt_ids, timesteps, y, guidance)`.

    img [B, Li, in_channels] (target then reference tokens), img_ids [B, Li, 3],
    txt [B, Lt, context_in_dim], txt_ids [B, Lt, 3], timesteps [B] in [0, 1],
    y [B, vec_in_dim], guidance [B] (required when cfg.guidance_embed)
    -> [B, Li, out_channels] in the compute dtype.
    """

    cfg: FluxConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"
    mlp_chunks: int = 1  # the blocks' MLPs on this many slices of the tokens (a smaller working set)

    def setup(self):
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.img_in = dense(cfg.hidden_size, ("in", "embed"), name="img_in", **kw)
        self.time_in = TwoLayerMLP(cfg.hidden_size, **kw)  # BFL MLPEmbedder
        if cfg.guidance_embed:
            self.guidance_in = TwoLayerMLP(cfg.hidden_size, **kw)
        self.vector_in = TwoLayerMLP(cfg.hidden_size, **kw)
        self.txt_in = dense(cfg.hidden_size, ("in", "embed"), name="txt_in", **kw)
        common = dict(
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            cfg=cfg,
            attention_impl=self.attention_impl,
            mlp_chunks=self.mlp_chunks,
            **kw,
        )
        self.double_blocks = stacked(DoubleStreamBlock, cfg.depth, name="double_blocks", **common)
        self.single_blocks = stacked(SingleStreamBlock, cfg.depth_single_blocks, name="single_blocks", **common)
        self.final_layer = LastLayer(cfg, **kw)

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        return self.run_blocks(*self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance))

    def embed(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        """The call's inputs embedded for the blocks: (img [B, Li, D], txt [B, Lt, D], vec [B, D], ids [B, Lt + Li,
        n_axes]), what `run_blocks` and the split calls (`first_blocks`, `rest_blocks`, `finish`) take."""
        cfg = self.cfg
        if img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img has {img.shape[-1]} features, config in_channels is {cfg.in_channels}")
        if txt.shape[-1] != cfg.context_in_dim:
            raise ValueError(f"txt has {txt.shape[-1]} features, config context_in_dim is {cfg.context_in_dim}")
        vec = self.embed_vector(timesteps, y, guidance)
        img, txt = constrain(self.img_in(img), ACT), constrain(self.txt_in(txt), ACT)
        return img, txt, vec, jnp.concatenate([txt_ids, img_ids], axis=1)

    def embed_vector(self, timesteps, y, guidance=None):
        """vec = time_in(emb(t)) [+ guidance_in(emb(g))] + vector_in(y), [B, D]."""
        # The reference casts t (and guidance) to the model dtype before the x1000.
        vec = self.time_in(timestep_embedding(timesteps.astype(self.dtype), 256).astype(self.dtype))
        if self.cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (guidance_embed=True): pass `guidance` [B]")
            vec = vec + self.guidance_in(timestep_embedding(guidance.astype(self.dtype), 256).astype(self.dtype))
        return vec + self.vector_in(y.astype(self.dtype))

    def run_blocks(self, img, txt, vec, ids):
        """Double blocks, single blocks and the final layer on embedded tokens -> [B, Li, out].

        img [B, Li, D], txt [B, Lt, D], vec [B, D], ids [B, Lt + Li, n_axes] ([txt | img]).
        """
        rope = rope_frequencies(ids, self.cfg.axes_dim, self.cfg.theta)
        (img, txt), _ = self.double_blocks((img, txt), vec, rope)
        x, _ = self.single_blocks(jnp.concatenate([txt, img], axis=1), vec, rope)
        return self.final_layer(x[:, txt.shape[1] :], vec)

    # -- the blocks in two parts, with the same parameters (step caching, `jaxedit.step_cache`): `run_blocks` is
    # finish(rest_blocks(*first_blocks(img, txt, vec, ids), vec, ids), vec), the first n double blocks, the others

    def _double_slice(self, lo: int, hi: int):
        """Double blocks lo..hi-1 as a callable on (img, txt), vec, rope (`layer_range` over the stacked
        parameters, with `double_blocks`' block arguments)."""
        block = DoubleStreamBlock(cfg=self.cfg, attention_impl=self.attention_impl, mlp_chunks=self.mlp_chunks,
                                  dtype=self.dtype, param_dtype=self.param_dtype, parent=None)  # fmt: skip
        return layer_range(block, self.variables["params"]["double_blocks"], lo, hi, scan=self.scan_layers)

    def first_blocks(self, img, txt, vec, ids, n: int = 1):
        """The first n double blocks on embedded tokens (`embed`) -> (img, txt) after them."""
        if not 1 <= n < self.cfg.depth:
            raise ValueError(f"the first part is 1 to {self.cfg.depth - 1} double blocks, got {n}")
        return self._double_slice(0, n)((img, txt), vec, rope_frequencies(ids, self.cfg.axes_dim, self.cfg.theta))

    def first_modulated(self, img, vec, ids=None):
        """The first double block's modulated image input LayerNorm(img) (1 + scale) + shift of its first image
        modulation [B, Li, D] (TeaCache's signal, `jaxedit.step_cache`; ids unused)."""
        params = jax.tree.map(lambda a: a[0], self.variables["params"]["double_blocks"]["img_mod"])
        mod = Modulation(2, dtype=self.dtype, param_dtype=self.param_dtype, parent=None)
        (shift, scale, _), _ = mod.apply({"params": params}, vec)
        return modulate(layer_norm(img), shift, scale)

    def rest_blocks(self, img, txt, vec, ids, n: int = 1):
        """The blocks after the first n double blocks (the other double blocks, the single blocks) on their
        output -> the image tokens' hidden states [B, Li, D] before the final layer (`finish`)."""
        rope = rope_frequencies(ids, self.cfg.axes_dim, self.cfg.theta)
        img, txt = self._double_slice(n, self.cfg.depth)((img, txt), vec, rope)
        x, _ = self.single_blocks(jnp.concatenate([txt, img], axis=1), vec, rope)
        return x[:, txt.shape[1] :]

    def finish(self, hidden, vec):
        """The final layer on the image tokens' hidden states -> [B, Li, out_channels]."""
        return self.final_layer(hidden, vec)


def example_inputs(cfg: FluxConfig, batch: int = 1, img_tokens: int = 1, txt_tokens: int = 1) -> tuple:
    """Zero inputs of `Flux(cfg)` (img, img_ids, txt, txt_ids, timesteps, y, guidance or None), e.g. for `init`."""
    b = batch
    return (
        jnp.zeros((b, img_tokens, cfg.in_channels)),
        jnp.zeros((b, img_tokens, 3)),
        jnp.zeros((b, txt_tokens, cfg.context_in_dim)),
        jnp.zeros((b, txt_tokens, 3)),
        jnp.zeros((b,)),
        jnp.zeros((b, cfg.vec_in_dim)),
        jnp.zeros((b,)) if cfg.guidance_embed else None,
    )


def abstract_params(cfg: FluxConfig, param_dtype: Dtype = jnp.float32, *, boxed: bool = False):
    """The parameter tree of `Flux(cfg)` as ShapeDtypeStructs (nothing allocated).

    boxed=True keeps the logical-partitioning metadata (for sharding rules).
    """
    model = Flux(cfg, param_dtype=param_dtype)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(cfg)))["params"]
    return tree if boxed else nn.meta.unbox(tree)
