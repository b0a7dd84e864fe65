"""The Qwen-Image VAE on single images, in Flax Linen (diffusers `AutoencoderKLQwenImage`, a fine-tune
of the Wan-2.1 video VAE: causal 3-D convolutions, channel RMS norms, 16 latent channels).

The edit pipelines encode and decode one frame: images [B, 3, 1, H, W] in [-1, 1] -> latents
[B, 16, 1, H/8, W/8] (the mean: `retrieve_latents(..., sample_mode="argmax")`). On one frame the video
network is a 2-D one, which is what this module runs, in NHWC:

- A causal conv (`QwenImageCausalConv3d`, kernel [O, I, kt, kh, kw]) pads time by kt - 1 zero frames in
  front and none behind (the first chunk has no cached frames), so the one output frame sees the input
  frame only through the last time tap, kernel[:, :, kt - 1]: a Conv2d with that slice (same spatial
  padding). The other taps meet zeros; the converter drops them (`checkpoints_convert.qwen_image_vae`).
- `Resample` "downsample3d" / "upsample3d" run their `time_conv` only from the second chunk on (the
  first stores its input in the cache, or marks it "Rep"); on one frame they equal "downsample2d" /
  "upsample2d": zero-pad right and bottom by one then a stride-2 3x3 conv, or nearest x2 then a 3x3
  conv that halves the channels.
- `RMS_norm`: x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma (no bias), float32 statistics.
- The mid-block attention is single-head over the H*W positions of the frame (`QwenImageAttentionBlock`).
- `decode` clamps its output to [-1, 1] as diffusers' `_decode` does.

Parameter paths are diffusers' names, with Flax leaf names: `encoder/down_blocks/{k}/conv1/kernel`
[3, 3, in, out] (the last time tap), `encoder/down_blocks/{k}/resample/1/kernel`, `.../norm1/gamma` [C],
`encoder/mid_block/attentions/0/to_qkv/kernel` [C, 3C] (a Dense), `quant_conv/kernel` [1, 1, 2z, 2z], ...

Latent normalisation is the pipeline's (`normalize`: (z - latents_mean) / latents_std before the
transformer; `denormalize` before decoding); `encode` / `decode` work on raw latents.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.configs import QwenImageVAEConfig
from jaxedit.models.attention import dot_product_attention
from jaxedit.models.autoencoder import conv
from jaxedit.models.layers import dense, ones
from jaxedit.parallel.sharding import param_init

Dtype = Any


def encoder_blocks(cfg: QwenImageVAEConfig) -> list[tuple[str, int, int]]:
    """The encoder's flat `down_blocks`, in order: ("residual", in, out), or (resample mode, dim, dim) with
    mode "downsample2d" / "downsample3d" after every level but the last."""
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    blocks = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            blocks.append(("residual", c_in, c_out))
            c_in = c_out
        if i != len(cfg.dim_mult) - 1:
            blocks.append(("downsample3d" if cfg.temperal_downsample[i] else "downsample2d", c_out, c_out))
    return blocks


def decoder_blocks(cfg: QwenImageVAEConfig) -> list[tuple[int, int, str | None]]:
    """The decoder's `up_blocks`: (in, out, upsample mode or None); each holds num_res_blocks + 1 residual
    blocks (in -> out, then out -> out), then an upsampler out -> out / 2 ("upsample2d" / "upsample3d")."""
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temperal_upsample = cfg.temperal_downsample[::-1]
    blocks = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        c_in = c_in // 2 if i > 0 else c_in
        mode = None if i == len(cfg.dim_mult) - 1 else ("upsample3d" if temperal_upsample[i] else "upsample2d")
        blocks.append((c_in, c_out, mode))
    return blocks


class RMSNorm(nn.Module):
    """Wan's channel RMS norm over [..., C]: x / max(||x||, 1e-12) * sqrt(C) * gamma, float32 inside."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        c = x_BHWC.shape[-1]
        gamma = self.param("gamma", param_init(ones, ("channels",)), (c,), self.param_dtype)
        x = x_BHWC.astype(jnp.float32)
        norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), 1e-12)
        return (x / norm * (c**0.5 * gamma.astype(jnp.float32))).astype(self.dtype)


class ModuleList(nn.Module):
    """The scope of a torch nn.ModuleList / nn.Sequential: `self(i, make, x)` runs child `make(name=str(i))`
    on x (a child called again by index is the same child)."""

    @nn.compact
    def __call__(self, i: int, make, x):
        return make(name=str(i))(x)


class _Base(nn.Module):
    cfg: QwenImageVAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @property
    def kw(self):
        """Arguments of child blocks."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)

    @property
    def lkw(self):
        """Arguments of layers (conv, dense, norm)."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def block(self, cls, **kw):
        """A child-block factory for `ModuleList`."""
        return functools.partial(cls, self.cfg, **kw, **self.kw)


class ResidualBlock(_Base):
    """norm1-silu-conv1-norm2-silu-conv2 (3x3: the causal convs' last time tap) plus the input, through a
    1x1 `conv_shortcut` if the widths differ: [B, H, W, in] -> [B, H, W, out_dim]."""

    out_dim: int = 0

    @nn.compact
    def __call__(self, x_BHWC):
        h = conv(self.out_dim, name="conv1", **self.lkw)(nn.silu(RMSNorm(name="norm1", **self.lkw)(x_BHWC)))
        h = conv(self.out_dim, name="conv2", **self.lkw)(nn.silu(RMSNorm(name="norm2", **self.lkw)(h)))
        if x_BHWC.shape[-1] != self.out_dim:
            x_BHWC = conv(self.out_dim, name="conv_shortcut", kernel=1, pad=0, **self.lkw)(x_BHWC)
        return x_BHWC.astype(self.dtype) + h


class AttentionBlock(_Base):
    """Single-head self-attention over the H*W positions (fused `to_qkv`, `proj`), RMS norm, residual."""

    @nn.compact
    def __call__(self, x_BHWC):
        b, h, w, c = x_BHWC.shape
        y = RMSNorm(name="norm", **self.lkw)(x_BHWC).reshape(b, h * w, 1, c)
        q, k, v = jnp.split(dense(3 * c, ("conv_in", "conv_out"), name="to_qkv", **self.lkw)(y), 3, axis=-1)
        out = dot_product_attention(q, k, v, impl=self.attention_impl).reshape(b, h, w, c)
        return x_BHWC.astype(self.dtype) + dense(c, ("conv_in", "conv_out"), name="proj", **self.lkw)(out)


class Resample(_Base):
    """One frame through `QwenImageResample`: the 2-D `resample` Sequential (its conv is child "1");
    `time_conv` does not act on a first frame.

    down*: zero-pad right and bottom by one, stride-2 3x3 VALID conv: [B, H, W, C] -> [B, H/2, W/2, C].
    up*: nearest x2 ("nearest-exact" at scale 2), 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C/2].
    """

    mode: str = "downsample2d"

    @nn.compact
    def __call__(self, x_BHWC):
        b, h, w, c = x_BHWC.shape
        if self.mode.startswith("down"):
            x = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
            make = functools.partial(conv, c, stride=2, pad="VALID", **self.lkw)
        elif self.mode.startswith("up"):
            x = jnp.broadcast_to(x_BHWC[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
            make = functools.partial(conv, c // 2, **self.lkw)
        else:
            raise ValueError(f"Resample: unknown mode {self.mode!r}")
        return ModuleList(name="resample")(1, make, x)


class MidBlock(_Base):
    """resnets.0, attentions.0, resnets.1 at constant width."""

    @nn.compact
    def __call__(self, x):
        resnets, res = ModuleList(name="resnets"), self.block(ResidualBlock, out_dim=x.shape[-1])
        x = resnets(0, res, x)
        x = ModuleList(name="attentions")(0, self.block(AttentionBlock), x)
        return resnets(1, res, x)


class UpBlock(_Base):
    """`resnets` (num_res_blocks + 1 residual blocks to out_dim), then `upsamplers.0` if `mode` is set."""

    out_dim: int = 0
    mode: str | None = None

    @nn.compact
    def __call__(self, x):
        resnets = ModuleList(name="resnets")
        for j in range(self.cfg.num_res_blocks + 1):
            x = resnets(j, self.block(ResidualBlock, out_dim=self.out_dim), x)
        if self.mode is not None:
            x = ModuleList(name="upsamplers")(0, self.block(Resample, mode=self.mode), x)
        return x


class Encoder(_Base):
    """`QwenImageEncoder3d` on one frame: [B, H, W, in] -> [B, H/f, W/f, 2 z_dim] (mean | logvar, before
    `quant_conv`), compute dtype."""

    @nn.compact
    def __call__(self, x_BHWC):
        cfg = self.cfg
        h = conv(cfg.base_dim, name="conv_in", **self.lkw)(x_BHWC)
        down = ModuleList(name="down_blocks")
        for k, (kind, _, c_out) in enumerate(encoder_blocks(cfg)):
            make = self.block(ResidualBlock, out_dim=c_out) if kind == "residual" else self.block(Resample, mode=kind)
            h = down(k, make, h)
        h = MidBlock(cfg, name="mid_block", **self.kw)(h)
        h = nn.silu(RMSNorm(name="norm_out", **self.lkw)(h))
        return conv(2 * cfg.z_dim, name="conv_out", **self.lkw)(h)


class Decoder(_Base):
    """`QwenImageDecoder3d` on one frame: [B, h, w, z_dim] (after `post_quant_conv`) -> [B, f h, f w, 3],
    compute dtype, not clamped."""

    @nn.compact
    def __call__(self, z_BHWC):
        cfg = self.cfg
        blocks = decoder_blocks(cfg)
        h = conv(blocks[0][0], name="conv_in", **self.lkw)(z_BHWC)
        h = MidBlock(cfg, name="mid_block", **self.kw)(h)
        up = ModuleList(name="up_blocks")
        for i, (_, c_out, mode) in enumerate(blocks):
            h = up(i, self.block(UpBlock, out_dim=c_out, mode=mode), h)
        h = nn.silu(RMSNorm(name="norm_out", **self.lkw)(h))
        return conv(cfg.input_channels, name="conv_out", **self.lkw)(h)


class QwenImageVAE(nn.Module):
    """Qwen-Image VAE on images: `apply({"params": p}, x, method="encode")`, `apply(..., z, method="decode")`.

    encode: image [B, H, W, 3] in [-1, 1] (H, W multiples of 8) -> mean latent [B, H/8, W/8, 16], float32
        (raw: the pipeline normalises it, `normalize`).
    decode: raw latent [B, h, w, 16] -> image [B, 8h, 8w, 3] clamped to [-1, 1], float32.
    encode_normalized / decode_normalized: the same with `normalize` / `denormalize` applied (the latent
        space the transformer sees, as FLUX's AutoEncoder.encode / decode give theirs).
    __call__(x) = decode(encode(x)) (creates every parameter at `init`).
    """

    cfg: QwenImageVAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # mid-block attention kernel (jaxedit.models.attention)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        lkw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        z = self.cfg.z_dim
        self.encoder = Encoder(self.cfg, **kw)
        self.quant_conv = conv(2 * z, name="quant_conv", kernel=1, pad=0, **lkw)
        self.post_quant_conv = conv(z, name="post_quant_conv", kernel=1, pad=0, **lkw)
        self.decoder = Decoder(self.cfg, **kw)

    def moments(self, x_BHWC):
        """(mean, logvar), each [B, H/8, W/8, z_dim] float32 (logvar unclamped; diffusers clamps it to
        [-30, 20] for sampling)."""
        cfg, f = self.cfg, self.cfg.downsample
        if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != cfg.in_channels:
            raise ValueError(f"QwenImageVAE.encode takes images [B, H, W, {cfg.in_channels}], got {x_BHWC.shape}")
        hh, ww = x_BHWC.shape[1:3]
        if hh % f or ww % f:
            raise ValueError(f"QwenImageVAE.encode: image size {hh}x{ww} (HxW) is not a multiple of {f}")
        h = self.quant_conv(self.encoder(x_BHWC.astype(self.dtype)))
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, logvar

    def encode(self, x_BHWC):
        """Image [B, H, W, 3] in [-1, 1] -> the posterior's mean [B, H/8, W/8, z_dim] float32 (raw)."""
        return self.moments(x_BHWC)[0]

    def decode(self, z_BHWC):
        """Raw latent [B, h, w, z_dim] -> image [B, 8h, 8w, 3] in [-1, 1] (clamped), float32."""
        cfg = self.cfg
        if z_BHWC.ndim != 4 or z_BHWC.shape[-1] != cfg.z_dim:
            raise ValueError(f"QwenImageVAE.decode takes latents [B, h, w, {cfg.z_dim}], got {z_BHWC.shape}")
        x = self.decoder(self.post_quant_conv(z_BHWC.astype(self.dtype)))
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    def encode_normalized(self, x_BHWC):
        """`normalize(cfg, encode(x))`: the latent the edit transformer takes."""
        return normalize(self.cfg, self.encode(x_BHWC))

    def decode_normalized(self, z_BHWC):
        """`decode(denormalize(cfg, z))` of a transformer latent."""
        return self.decode(denormalize(self.cfg, z_BHWC))

    def __call__(self, x_BHWC):
        return self.decode(self.encode(x_BHWC))


def normalize(cfg: QwenImageVAEConfig, z_BHWC):
    """(z - latents_mean) / latents_std per channel (last axis), float32: the pipeline's `_encode_vae_image`."""
    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    std = jnp.asarray(cfg.latents_std, jnp.float32)
    return (jnp.asarray(z_BHWC, jnp.float32) - mean) / std


def denormalize(cfg: QwenImageVAEConfig, z_BHWC):
    """z * latents_std + latents_mean per channel (last axis), float32: what the pipeline does before decoding."""
    mean = jnp.asarray(cfg.latents_mean, jnp.float32)
    std = jnp.asarray(cfg.latents_std, jnp.float32)
    return jnp.asarray(z_BHWC, jnp.float32) * std + mean


def example_inputs(cfg: QwenImageVAEConfig, batch: int = 1) -> tuple:
    """Zero inputs of `QwenImageVAE(cfg)` (one image of one latent cell), e.g. for `init`."""
    f = cfg.downsample
    return (jnp.zeros((batch, f, f, cfg.in_channels)),)


def abstract_params(cfg: QwenImageVAEConfig, param_dtype: Dtype = jnp.float32, *, boxed: bool = False):
    """The parameter tree of `QwenImageVAE(cfg)` as ShapeDtypeStructs (nothing allocated).

    boxed=True keeps the logical-partitioning metadata (for sharding rules).
    """
    tree = _abstract_params(cfg, np.dtype(param_dtype))
    tree = jax.tree.map(lambda a: a, tree)  # a fresh container tree: the cached one is shared
    return tree if boxed else nn.meta.unbox(tree)


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg: QwenImageVAEConfig, param_dtype: np.dtype):
    model = QwenImageVAE(cfg, param_dtype=param_dtype)
    x = jax.ShapeDtypeStruct(example_inputs(cfg)[0].shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
