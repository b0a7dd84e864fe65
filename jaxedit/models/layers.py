"""Building blocks of the FLUX DiT (BFL `flux/modules/layers.py`, `flux/math.py`).

Precision follows the reference: timestep sinusoids, RoPE, RMSNorm and LayerNorm
statistics are float32 whatever the compute dtype; results are cast back.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import quant
from jaxedit.parallel.sharding import param_init

Dtype = Any

default_kernel_init = nn.initializers.lecun_normal()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


# the logical names of the main activations (the rule table in jaxedit/parallel/sharding.py maps them)
ACT = ("act_batch", "act_length", "act_embed")  # [B, L, D]
ACT_HEADS = ("act_batch", "act_length", "act_heads", None)  # [B, L, H, Dh]
ACT_MLP = ("act_batch", "act_length", "act_mlp")  # [B, L, F]


class MultiOutDense(nn.Module):
    """Linear map to one or several output axes: kernel [in, *features], bias [*features].

    (flax's DenseGeneral builds its kernel flat and reshapes it, which breaks logical
    sharding constraints on multi-axis kernels.) A quantised kernel (int8 / fp8 with its
    `kernel_scale` beside it, `jaxedit.quant`) runs as a qwix matmul.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool = True
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, split: bool = False):
        """x [..., in] -> [..., *features]; split=True: a tuple of the outputs of each index of the first output
        axis, each its own matmul (a fused q/k/v projection as three: each result its own buffer, which the
        attention kernel takes as it is, where slices of one buffer would be copied)."""
        out_axes = tuple(range(1, 1 + len(self.features)))
        init = zeros if self.zero_init else nn.initializers.lecun_normal(in_axis=0, out_axis=out_axes)
        shape = (x.shape[-1], *self.features)
        kernel = self.param("kernel", param_init(init, self.kernel_axes), shape, self.param_dtype)
        scale = None
        if jnp.dtype(kernel.dtype).itemsize == 1 and self.has_variable("params", quant.SCALE):
            scale = self.get_variable("params", quant.SCALE)
        bias = None
        if self.use_bias:
            bias = self.param("bias", param_init(zeros, self.kernel_axes[1:]), self.features, self.param_dtype)

        def project(k, s, b):
            if s is not None:
                y = quant.matmul(x, k, s, self.dtype)
            else:
                y = jnp.tensordot(x.astype(self.dtype), k.astype(self.dtype), axes=((x.ndim - 1,), (0,)))
            return y if b is None else y + b.astype(self.dtype)

        if not split:
            return project(kernel, scale, bias)
        return tuple(
            project(kernel[:, i], None if scale is None else scale[:, i], None if bias is None else bias[i])
            for i in range(self.features[0])
        )


def dense(features, axes, *, name, dtype, param_dtype, use_bias=True, zero_init=False):
    """A Dense layer whose kernel carries logical `axes` (in-axis first); tuple features
    give a kernel [in, *features]."""
    features = (features,) if isinstance(features, int) else tuple(features)
    return MultiOutDense(features, axes, use_bias, zero_init, dtype, param_dtype, name=name)


# exp(-ln(10000) * i / 128), i < 128, as torch computes it in float32 (torch 2.13 on the CPU, what both
# references' 256-wide timestep embeddings use), as float32 bit patterns: here two of them (i = 12, 106) are one
# ulp from the correctly rounded value, which at arguments up to 4,000 rad moves the DiT by ~1e-5
# (tests/test_timestep_freqs.py checks the table against the installed torch).
TORCH_FREQS_128_BITS = (
    "3f800000 3f6e39f8 3f5dafd6 3f4e4bac 3f3ff911 3f32a506 3f263de0 3f1ab32b 3f0ff59a 3f05f6ee 3ef953ce "
    "3ee80460 3ed7e89b 3ec8eb23 3ebaf81b 3eadfcff 3ea1e89b 3e96aaea 3e8c3503 3e827908 3e72d422 3e61f836 "
    "3e5247ed 3e43ae7c 3e361887 3e297409 3e1db03f 3e12bd90 3e088d77 3dfe24df 3dec7fd5 3ddc1464 3dcccccc "
    "3dbe94c7 3db15978 3da50957 3d99940d 3d8eea6c 3d84fe4c 3d778511 3d6655c1 3d5657e3 3d477640 3d399d18 "
    "3d2cba15 3d20bc1b 3d159348 3d0b30cb 3d0186e2 3cf11177 3ce054d1 3cd0c1a8 3cc2434e 3cb4c691 3ca83989 "
    "3c9c8b96 3c91ad39 3c879009 3c7c4d30 3c6ac8e6 3c5a7bf1 3c4b50b5 3c3d330e 3c301050 3c23d70a 3c187706 "
    "3c0de12e 3c040777 3bf5b9ad 3be4aa45 3bd4ca15 3bc6040a 3bb8449a 3bab7982 3b9f91cc 3b947daf 3b8a2e75 "
    "3b80967c 3b6f520d 3b5eb47a 3b4f3e33 3b40dac2 3b33770d 3b270153 3b1b690d 3b109ed8 3b06946d 3afa78f0 "
    "3ae91528 3ad8e675 3ac9d759 3abbd3eb 3aaec98e 3aa2a6f7 3a975c0b 3a8cd9d9 3a83126e 3a73f1a2 3a6301e3 "
    "3a533f24 3a44948a 3a36ee9d 3a2a3b44 3a1e69a2 3a136a14 3a092e01 39ff4fad 39ed95e4 39dd1721 39cdbd93 "
    "39bf74d6 39b229fb 39a5cb61 399a48a0 398f9275 39859aa4 3978a80d 3967648c 395753e2 394860bf 393a7753 "
    "392d852a 39217919 39164326 390bd46d 39021f28 38f22cdd 38e15c8e"
)
TORCH_FREQS_128 = np.array([int(w, 16) for w in TORCH_FREQS_128_BITS.split()], np.uint32).view(np.float32)


def sinusoid_freqs(half: int, max_period: float) -> np.ndarray:
    """exp(-ln(P) * i / half) as the references compute it: the exponent rounded to float32 first, then torch's
    float32 exp (TORCH_FREQS_128, the width the models use); other widths: exp in float64, rounded once."""
    if (half, max_period) == (128, 10000.0):
        return TORCH_FREQS_128.copy()
    arg = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(arg.astype(np.float64)).astype(np.float32)


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0, time_factor: float = 1000.0):
    """Sinusoidal embedding [B, dim] = [cos, sin] of `time_factor * t` (BFL timestep_embedding).

    `t * time_factor` is computed in t's dtype (the reference casts t to the model dtype
    first); the sinusoid is float32. Its frequencies are a host constant: arguments reach
    1000 rad, where one ulp of a frequency moves cos/sin by ~1e-4.
    """
    t_B = time_factor * t_B
    half = dim // 2
    freqs = jnp.asarray(sinusoid_freqs(half, max_period))
    args = t_B[:, None].astype(jnp.float32) * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TwoLayerMLP(nn.Module):
    """Linear -> SiLU -> Linear, [..., in] -> [..., hidden]; `names` are the reference's: ("in_layer",
    "out_layer") for BFL's MLPEmbedder, ("0", "2") for an nn.Sequential, ("linear_1", "linear_2") for
    a TextProjection."""

    hidden_size: int
    names: tuple[str, str] = ("in_layer", "out_layer")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.hidden_size, ("in", "embed"), name=self.names[0], **kw)(x)
        return dense(self.hidden_size, ("embed", "embed_out"), name=self.names[1], **kw)(nn.silu(x))


def rms_normalize(x, eps: float = 1e-6):
    """x / rms(x) computed in float32, cast back to x's dtype."""
    x32 = x.astype(jnp.float32)
    rrms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * rrms).astype(x.dtype)


def layer_norm(x, eps: float = 1e-6):
    """LayerNorm without affine parameters, statistics in float32."""
    return _layer_norm(x, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _layer_norm(x, eps: float):
    return _layer_norm_fwd(x, eps)[0]


def _layer_norm_fwd(x, eps: float):
    """The output and the backward's residuals: the input and the per-token float32 mean and 1/std."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
    return ((x32 - mean) * rstd).astype(x.dtype), (x, mean, rstd)


def _layer_norm_bwd(eps: float, res, g):
    """dx = rstd (g - mean(g) - y mean(g y)): the closed form, a few fused passes over [.., D] instead of
    autodiff's chain through mean, variance and rsqrt."""
    x, mean, rstd = res
    y, g32 = (x.astype(jnp.float32) - mean) * rstd, g.astype(jnp.float32)
    dx = rstd * (g32 - jnp.mean(g32, axis=-1, keepdims=True) - y * jnp.mean(g32 * y, axis=-1, keepdims=True))
    return (dx.astype(x.dtype),)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class RMSNorm(nn.Module):
    """BFL RMSNorm: normalise in float32, cast back, times a learned `scale`."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", param_init(ones, ("head_dim",)), (x.shape[-1],), self.param_dtype)
        return rms_normalize(x.astype(self.dtype)) * scale.astype(self.dtype)


class QKNorm(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return RMSNorm(name="query_norm", **kw)(q), RMSNorm(name="key_norm", **kw)(k)


class Modulation(nn.Module):
    """Linear(silu(vec)) chunked into (shift, scale, gate) x n, each [B, 1, D]."""

    n: int  # 2 for double-stream blocks, 1 for single-stream blocks
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vec_BD):
        d = vec_BD.shape[-1]
        out = dense(
            3 * self.n * d,
            ("embed", "mod"),
            name="lin",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            zero_init=True,
        )(nn.silu(vec_BD))[:, None, :]
        chunks = jnp.split(out, 3 * self.n, axis=-1)
        return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.n)]


def modulate(x, shift, scale):
    return (1 + scale) * x + shift


def rope_frequencies(ids_BLA: jax.Array, axes_dim: tuple[int, ...], theta: int):
    """(cos, sin), each [B, L, sum(axes_dim)/2] float32, for position ids [B, L, n_axes].

    The reference computes the angles pos * omega in float64 and rounds cos/sin to
    float32. Plain float32 angles would be off by up to |pos| * 2^-24 rad, which the
    network amplifies; instead omega = hi + lo with `hi` holding 12 significant bits, so
    pos * hi is exact for integer |pos| < 4096, and the angle is carried as a float32
    pair (s, e): cos(s + e) ~ cos(s) - e sin(s). This matches float64 angles to about
    one float32 ulp without float64 on the device.
    """
    omega = np.concatenate([1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dim])
    axis_of = np.concatenate([np.full(d // 2, i) for i, d in enumerate(axes_dim)])
    mant, expo = np.frexp(omega)
    hi = np.ldexp(np.floor(mant * 2**12) / 2**12, expo)
    lo = omega - hi
    pos = ids_BLA.astype(jnp.float32)[..., axis_of]  # [B, L, P]
    a = pos * jnp.asarray(hi, jnp.float32)
    b = pos * jnp.asarray(lo, jnp.float32)
    s = a + b
    e = (a - s) + b  # Fast2Sum: |a| >= |b|
    cos, sin = jnp.cos(s), jnp.sin(s)
    return cos - e * sin, sin + e * cos


def apply_rope(x_BLHD, cos_BLP, sin_BLP):
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... in float32; cast back."""
    b, l, h, d = x_BLHD.shape
    x = x_BLHD.astype(jnp.float32).reshape(b, l, h, d // 2, 2)
    cos, sin = cos_BLP[:, :, None, :], sin_BLP[:, :, None, :]
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(b, l, h, d).astype(x_BLHD.dtype)
