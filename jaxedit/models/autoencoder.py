"""The FLUX 16-channel VAE in Flax Linen (BFL `flux/modules/autoencoder.py`).

Images and latents are NHWC inside JAX: images [B, H, W, 3] in [-1, 1], latents
[B, H/8, W/8, 16] (the PyTorch references are NCHW; transpose at the boundary).
Parameter names follow the BFL checkpoint (`encoder.down.{i}.block.{j}.norm1`,
`encoder.mid.attn_1.q`, `decoder.up.{k}.upsample.conv`, ...), with Flax leaf names:
convs hold `kernel` [kh, kw, in, out] and `bias`; GroupNorms `scale` and `bias`; the
mid-block attention's 1x1 convs are Dense `kernel` [in, out] and `bias`.

Precision: GroupNorm statistics and affine, the attention softmax and the latent
scaling are float32 whatever the compute dtype; encode/decode return float32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.configs import AutoEncoderConfig
from jaxedit.models.attention import dot_product_attention
from jaxedit.models.layers import default_kernel_init, dense, ones, zeros
from jaxedit.parallel.sharding import param_init

Dtype = Any


class GroupNorm(nn.Module):
    """GroupNorm over [B, H, W, C]: statistics and affine in float32, output in `dtype`."""

    groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        b, h, w, c = x_BHWC.shape
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.groups} groups")
        scale = self.param("scale", param_init(ones, ("channels",)), (c,), self.param_dtype)
        bias = self.param("bias", param_init(zeros, ("channels",)), (c,), self.param_dtype)
        per_group = c // self.groups

        def group_mean(a):  # [B, H, W, C] -> its group means, per channel [B, 1, 1, C]
            m = a.sum(axis=(1, 2)).reshape(b, self.groups, per_group).sum(-1) / (h * w * per_group)
            return jnp.repeat(m, per_group, axis=-1)[:, None, None, :]

        x = x_BHWC.astype(jnp.float32)
        mean = group_mean(x)
        var = group_mean(jnp.square(x - mean))  # two-pass variance
        mul = jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
        return (x * mul + (bias.astype(jnp.float32) - mean * mul)).astype(self.dtype)


def conv(features: int, *, name: str, dtype: Dtype, param_dtype: Dtype, kernel: int = 3, stride: int = 1, pad=1):
    """A Conv2d (NHWC) with kernel [k, k, in, out] carrying logical axes (None, None, conv_in, conv_out)."""
    padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=param_init(default_kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=param_init(zeros, ("conv_out",)),
        name=name,
    )


class _Base(nn.Module):
    cfg: AutoEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @property
    def kw(self):
        """Arguments of child blocks."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)

    @property
    def lkw(self):
        """Arguments of layers (conv, dense)."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def norm(self, name: str):
        return GroupNorm(self.cfg.norm_groups, self.cfg.eps, self.dtype, self.param_dtype, name=name)


class ResnetBlock(_Base):
    """norm1-swish-conv1-norm2-swish-conv2 plus the input (through a 1x1 `nin_shortcut` if widths differ)."""

    out_channels: int = 0

    @nn.compact
    def __call__(self, x_BHWC):
        c_out = self.out_channels
        h = conv(c_out, name="conv1", **self.lkw)(nn.swish(self.norm("norm1")(x_BHWC)))
        h = conv(c_out, name="conv2", **self.lkw)(nn.swish(self.norm("norm2")(h)))
        if x_BHWC.shape[-1] != c_out:
            x_BHWC = conv(c_out, name="nin_shortcut", kernel=1, pad=0, **self.lkw)(x_BHWC)
        return x_BHWC.astype(self.dtype) + h


class AttnBlock(_Base):
    """Single-head self-attention over the H*W positions, with GroupNorm and a residual."""

    @nn.compact
    def __call__(self, x_BHWC):
        b, h, w, c = x_BHWC.shape
        y = self.norm("norm")(x_BHWC).reshape(b, h * w, 1, c)
        q, k, v = (dense(c, ("conv_in", "conv_out"), name=n, **self.lkw)(y) for n in ("q", "k", "v"))
        out = dot_product_attention(q, k, v, impl=self.attention_impl).reshape(b, h, w, c)
        return x_BHWC.astype(self.dtype) + dense(c, ("conv_in", "conv_out"), name="proj_out", **self.lkw)(out)


class Downsample(_Base):
    """Zero-pad right and bottom by one, then a stride-2 3x3 VALID conv: [B, H, W, C] -> [B, H/2, W/2, C]."""

    @nn.compact
    def __call__(self, x_BHWC):
        x = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], name="conv", stride=2, pad="VALID", **self.lkw)(x)


class Upsample(_Base):
    """Nearest-neighbour x2 then a 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""

    @nn.compact
    def __call__(self, x_BHWC):
        b, h, w, c = x_BHWC.shape
        x = jnp.broadcast_to(x_BHWC[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return conv(c, name="conv", **self.lkw)(x)


class _Blocks(_Base):
    """ResnetBlocks named "0", "1", ... applied in order (BFL `down[i].block` / `up[i].block`)."""

    num: int = 1
    out_channels: int = 0

    @nn.compact
    def __call__(self, x):
        for j in range(self.num):
            x = ResnetBlock(self.cfg, out_channels=self.out_channels, name=str(j), **self.kw)(x)
        return x


class _Level(_Base):
    """One resolution: `block` (ResnetBlocks), then `downsample` / `upsample` if `resample` is set."""

    num: int = 1
    out_channels: int = 0
    resample: str | None = None  # "downsample", "upsample" or None

    @nn.compact
    def __call__(self, x):
        x = _Blocks(self.cfg, num=self.num, out_channels=self.out_channels, name="block", **self.kw)(x)
        if self.resample == "downsample":
            x = Downsample(self.cfg, name="downsample", **self.kw)(x)
        elif self.resample == "upsample":
            x = Upsample(self.cfg, name="upsample", **self.kw)(x)
        return x


class _Levels(_Base):
    """Levels named by their resolution index; the encoder runs 0, 1, ...; the decoder runs ..., 1, 0."""

    decoder: bool = False

    @nn.compact
    def __call__(self, x):
        cfg, n = self.cfg, len(self.cfg.ch_mult)
        for i in reversed(range(n)) if self.decoder else range(n):
            if self.decoder:
                num, resample = cfg.num_res_blocks + 1, "upsample" if i else None
            else:
                num, resample = cfg.num_res_blocks, "downsample" if i < n - 1 else None
            width = cfg.ch * cfg.ch_mult[i]
            x = _Level(cfg, num=num, out_channels=width, resample=resample, name=str(i), **self.kw)(x)
        return x


class _Mid(_Base):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(self.cfg, out_channels=c, name="block_1", **self.kw)(x)
        x = AttnBlock(self.cfg, name="attn_1", **self.kw)(x)
        return ResnetBlock(self.cfg, out_channels=c, name="block_2", **self.kw)(x)


class Encoder(_Base):
    """[B, H, W, in_channels] -> moments [B, H/8, W/8, 2 * z_channels] (mean | logvar), compute dtype."""

    @nn.compact
    def __call__(self, x_BHWC):
        cfg = self.cfg
        h = conv(cfg.ch, name="conv_in", **self.lkw)(x_BHWC)
        h = _Levels(cfg, name="down", **self.kw)(h)
        h = _Mid(cfg, name="mid", **self.kw)(h)
        h = nn.swish(self.norm("norm_out")(h))
        return conv(2 * cfg.z_channels, name="conv_out", **self.lkw)(h)


class Decoder(_Base):
    """[B, h, w, z_channels] -> [B, 8h, 8w, out_ch], compute dtype."""

    @nn.compact
    def __call__(self, z_BHWC):
        cfg = self.cfg
        h = conv(cfg.ch * cfg.ch_mult[-1], name="conv_in", **self.lkw)(z_BHWC)
        h = _Mid(cfg, name="mid", **self.kw)(h)
        h = _Levels(cfg, decoder=True, name="up", **self.kw)(h)
        h = nn.swish(self.norm("norm_out")(h))
        return conv(cfg.out_ch, name="conv_out", **self.lkw)(h)


class AutoEncoder(nn.Module):
    """FLUX VAE: `apply({"params": p}, x, method="encode")`, `apply({"params": p}, z, method="decode")`.

    encode: image [B, H, W, 3] in [-1, 1] (H, W multiples of 8) -> latent [B, H/8, W/8, 16]
        = scale_factor * (mean - shift_factor), float32. With a PRNG `key`, the latent is a
        sample mean + std * N(0, 1) of the diagonal Gaussian instead of its mean.
    decode: latent [B, h, w, 16] -> image [B, 8h, 8w, 3] = D(z / scale_factor + shift_factor), float32.
    __call__(x) = decode(encode(x)) (creates every parameter at `init`).
    """

    cfg: AutoEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"  # mid-block attention kernel (jaxedit.models.attention); long sequences use "chunked"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        self.encoder = Encoder(self.cfg, **kw)
        self.decoder = Decoder(self.cfg, **kw)

    def moments(self, x_BHWC):
        """Encoder output split into (mean, logvar), each [B, H/8, W/8, z_channels] float32."""
        cfg, f = self.cfg, self.cfg.downsample
        if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != cfg.in_channels:
            raise ValueError(f"AutoEncoder.encode takes images [B, H, W, {cfg.in_channels}], got {x_BHWC.shape}")
        hh, ww = x_BHWC.shape[1:3]
        if hh % f or ww % f:
            raise ValueError(f"AutoEncoder.encode: image size {hh}x{ww} (HxW) is not a multiple of {f}")
        mean, logvar = jnp.split(self.encoder(x_BHWC).astype(jnp.float32), 2, axis=-1)
        return mean, logvar

    def encode(self, x_BHWC, key: jax.Array | None = None):
        """Image [B, H, W, 3] in [-1, 1] -> latent [B, H/8, W/8, 16] float32 (mean, or a sample given `key`)."""
        return latent_from_moments(self.cfg, *self.moments(x_BHWC), key)

    def decode(self, z_BHWC):
        """Latent [B, h, w, 16] -> image [B, 8h, 8w, 3] float32 (nominally in [-1, 1], not clipped)."""
        cfg = self.cfg
        if z_BHWC.ndim != 4 or z_BHWC.shape[-1] != cfg.z_channels:
            raise ValueError(f"AutoEncoder.decode takes latents [B, h, w, {cfg.z_channels}], got {z_BHWC.shape}")
        z = z_BHWC.astype(jnp.float32) / cfg.scale_factor + cfg.shift_factor
        return self.decoder(z.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, x_BHWC):
        return self.decode(self.encode(x_BHWC))


def latent_from_moments(cfg: AutoEncoderConfig, mean, logvar, key: jax.Array | None = None):
    """scale_factor * (z - shift_factor) with z the mean, or a sample mean + std * N(0, 1) given `key`.

    BFL / Step1X-Edit DiagonalGaussian: no logvar clamp (diffusers clamps to [-30, 20]).
    """
    z = mean
    if key is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    return cfg.scale_factor * (z - cfg.shift_factor)


# ---------------------------------------------------------------------------------------
# Tiled encode / decode: bounded memory for large images


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of size min(tile, n) covering [0, n) with stride tile - overlap; the last is flush."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _blend_weights(start: int, size: int, n: int, ramp: int) -> np.ndarray:
    """[size] weights along one axis: linear ramps (never 0) over `ramp` cells at edges inside the image."""
    w = np.ones(size, np.float64)
    r = (np.arange(ramp) + 1) / (ramp + 1)
    if ramp and start > 0:
        w[:ramp] = np.minimum(w[:ramp], r)
    if ramp and start + size < n:
        w[size - ramp :] = np.minimum(w[size - ramp :], r[::-1])
    return w


def tiled(fn, x_BHWC, tile: int, overlap: int, up: int, down: int):
    """Run `fn` on overlapping tiles of x one at a time (`lax.map`) and blend the outputs.

    fn maps [B, t, t', C] to a pytree of [B, t*up/down, t'*up/down, C'] arrays. Each output
    cell is the weighted mean of the tiles covering it; weights ramp linearly across overlaps.
    """
    b, h, w, _ = x_BHWC.shape
    if h <= tile and w <= tile:
        return fn(x_BHWC)
    th, tw = min(tile, h), min(tile, w)
    corners = [(y, x) for y in _tile_starts(h, tile, overlap) for x in _tile_starts(w, tile, overlap)]
    outs = jax.lax.map(fn, jnp.stack([x_BHWC[:, y : y + th, x : x + tw] for y, x in corners]))

    s = lambda v: v * up // down  # noqa: E731  (input cells -> output cells)
    ramp, total = s(overlap), np.zeros((s(h), s(w)))
    weights = []
    for y, x in corners:
        wt = np.outer(_blend_weights(s(y), s(th), s(h), ramp), _blend_weights(s(x), s(tw), s(w), ramp))
        total[s(y) : s(y + th), s(x) : s(x + tw)] += wt
        weights.append(wt)

    def blend(out_N):
        acc = jnp.zeros((b, s(h), s(w), out_N.shape[-1]), jnp.float32)
        for i, (y, x) in enumerate(corners):
            part = out_N[i].astype(jnp.float32) * jnp.asarray(weights[i], jnp.float32)[None, :, :, None]
            acc = acc.at[:, s(y) : s(y + th), s(x) : s(x + tw)].add(part)
        return acc / jnp.asarray(total, jnp.float32)[None, :, :, None]

    return jax.tree.map(blend, outs)


def decode_tiled(model: AutoEncoder, params, z_BHWC: jax.Array, *, tile: int = 64, overlap: int = 16) -> jax.Array:
    """`model.decode` of latents [B, h, w, 16] in overlapping tiles of tile x tile latent cells -> [B, f h, f w, 3]
    (f = the VAE's downsampling factor, `cfg.downsample`: 8 for FLUX's).

    Peak memory is that of one tile (XLA CPU buffer assignment, full-width FLUX VAE, float32,
    1024x1024: 0.65 GiB of temporaries at tile 64 = 512 px, against 2.50 GiB untiled; the
    weights add 0.19 GiB). Tiles see only their own GroupNorm statistics and attention
    context, so the result differs from `decode`; weights ramp linearly over the `overlap`
    (latent cells) to hide seams. Equal to `decode` when one tile covers z (the same program
    is traced). Measured error against `decode`, random weights (an upper bound: random
    networks are far more context-sensitive than trained ones; no trained weights were
    available): relative L2 0.25 on the small test model (6x10 latents, tile 6, overlap 2;
    diffusers' own `enable_tiling` at the same tiles: 0.34), 0.64 at full width, 256x256,
    tile 16, overlap 4 (diffusers: 0.76; benchmarks/vae.py).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"decode_tiled: overlap {overlap} must be in [0, tile={tile})")
    up = model.cfg.downsample
    return tiled(lambda t: model.apply({"params": params}, t, method="decode"), z_BHWC, tile, overlap, up, 1)


def encode_tiled(
    model: AutoEncoder,
    params,
    x_BHWC: jax.Array,
    key: jax.Array | None = None,
    *,
    tile: int = 512,
    overlap: int = 128,
) -> jax.Array:
    """`model.encode` of images [B, H, W, 3] in overlapping tiles of tile x tile pixels -> [B, H/8, W/8, 16].

    The moments (mean, logvar) are blended across tiles, then scaled (and sampled, given
    `key`) as in `encode`. tile and overlap are pixels, multiples of 8. Equal to `encode`
    when one tile covers x; otherwise approximate, like `decode_tiled` (random weights, small
    test model, 48x80 image, tile 48, overlap 16: relative L2 0.27; diffusers' tiling 0.32).
    Memory, full width, float32, 1024x1024: 0.41 GiB of temporaries against 1.53 GiB untiled.
    """
    f = model.cfg.downsample
    if tile % f or overlap % f or not 0 <= overlap < tile:
        raise ValueError(f"encode_tiled: tile {tile} and overlap {overlap} must be multiples of {f}, overlap < tile")
    h, w = x_BHWC.shape[1:3]
    if h % f or w % f:
        raise ValueError(f"AutoEncoder.encode: image size {h}x{w} (HxW) is not a multiple of {f}")
    fn = lambda t: model.apply({"params": params}, t, method="moments")  # noqa: E731
    mean, logvar = tiled(fn, x_BHWC, tile, overlap, 1, f)
    return latent_from_moments(model.cfg, mean, logvar, key)


def abstract_params(cfg: AutoEncoderConfig, param_dtype: Dtype = jnp.float32, *, boxed: bool = False):
    """The parameter tree of `AutoEncoder(cfg)` as ShapeDtypeStructs (nothing allocated).

    boxed=True keeps the logical-partitioning metadata (for sharding rules).
    """
    tree = _abstract_params(cfg, np.dtype(param_dtype))
    tree = jax.tree.map(lambda a: a, tree)  # a fresh container tree: the cached one is shared
    return tree if boxed else nn.meta.unbox(tree)


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg: AutoEncoderConfig, param_dtype: np.dtype):
    model = AutoEncoder(cfg, param_dtype=param_dtype)
    f = cfg.downsample
    x = jax.ShapeDtypeStruct((1, f, f, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
