"""Qwen-Image's 3-axis RoPE (diffusers `QwenEmbedRope` with `scale_rope=True`) as a pure function of the layout.

Each image of a sample (the target first, then the references) is a grid `(frames, height, width)` of
patch tokens. Token (f, i, j) of image n has positions
  frame  n + f
  height i - ceil(h / 2)     (-ceil(h/2) .. floor(h/2) - 1: the grid centred on 0)
  width  j - ceil(w / 2)
and the text tokens follow the largest image: text token k has position s + k on all three axes, with
s = max over the images of max(h // 2, w // 2). The angles are float32(position) * omega in float32, as
torch's `outer` of the integer positions with the float32 frequencies computes them (bit for bit), so only
the integer positions [L, 3] are a host constant; cos / sin run on the device.

omega = 1 / theta ** (2i / d) per axis, as torch computes it in float32: its `pow` is not always correctly
rounded (for the published 56-wide axes the power of i = 11 is one ulp below the correctly rounded value,
so is omega's reciprocal), so the widths the released models use are torch's values as float32 bit patterns
(TORCH_OMEGA_BITS; tests/test_qwen_image.py checks them against the installed torch); other widths round
the power once from float64 and take its reciprocal in float32 (torch's values up to that one ulp, which
moves an angle by at most position * 1.9e-9 rad).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ImgShapes = tuple[tuple[int, int, int], ...]

# (width, theta) -> torch's float32 1 / theta ** (arange(0, width, 2) / width) (torch 2.13 on the CPU)
TORCH_OMEGA_BITS = {
    (16, 10000): "3f800000 3ea1e89b 3dcccccd 3d0186e3 3c23d70a 3b4f3e38 3a83126f 39a5cb60",
    (56, 10000): "3f800000 3f383d52 3f049834 3ebeda51 3e895aa1 3e45b415 3e0e48ca 3dcccccd 3d936440 3d5426bb "
    "3d18aea7 3cdbc437 3c9e29aa 3c63a7ac 3c23d70a 3bebd39f 3ba9b892 3b744aa4 3b2fd02c 3afd0f7c 3ab61fb9 3a83126f "
    "3a3ca94c 3a07c6db 39c36ee9 398ca689 394a72c8 3911b2fb",
}


def as_img_shapes(img_shapes: Sequence[Sequence[int]]) -> ImgShapes:
    """The layout as a tuple of (frames, height, width) tuples of Python ints (ValueError otherwise: it
    must be static, known when the program is traced)."""
    try:
        out = tuple(tuple(int(n) for n in s) for s in img_shapes)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"img_shapes must be a static sequence of (frames, height, width) ints: {e}") from None
    if not out or any(len(s) != 3 or min(s) < 1 for s in out):
        raise ValueError(f"img_shapes must be a non-empty sequence of positive (frames, height, width), got {out}")
    return out


def image_tokens(img_shapes: ImgShapes) -> list[int]:
    """Number of tokens of each image: frames * height * width."""
    return [f * h * w for f, h, w in img_shapes]


def text_start(img_shapes: ImgShapes) -> int:
    """The position of the first text token: the largest image's half extent."""
    return max(max(h // 2, w // 2) for _, h, w in img_shapes)


def image_positions(img_shapes: ImgShapes) -> np.ndarray:
    """Positions [sum(f*h*w), 3] (frame, height, width) of the image tokens, image after image, row-major."""
    out = []
    for n, (f, h, w) in enumerate(img_shapes):
        grid = np.meshgrid(n + np.arange(f), np.arange(h) - (h - h // 2), np.arange(w) - (w - w // 2), indexing="ij")
        out.append(np.stack(grid, axis=-1).reshape(-1, 3))
    return np.concatenate(out).astype(np.int32)


def positions(img_shapes: ImgShapes, txt_len: int) -> np.ndarray:
    """Positions [txt_len + image tokens, 3] of the joint sequence [text | images]."""
    txt = np.repeat(text_start(img_shapes) + np.arange(txt_len, dtype=np.int32)[:, None], 3, axis=1)
    return np.concatenate([txt, image_positions(img_shapes)]).astype(np.int32)


def omega(axes_dim: Sequence[int], theta: float) -> np.ndarray:
    """The rotation frequencies [sum(axes_dim) / 2] float32, axis after axis."""
    parts = []
    for d in axes_dim:
        if (d, theta) in TORCH_OMEGA_BITS:
            parts.append(np.array([int(w, 16) for w in TORCH_OMEGA_BITS[d, theta].split()], np.uint32).view(np.float32))
            continue
        exponent = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
        power = (float(theta) ** exponent.astype(np.float64)).astype(np.float32)
        parts.append(np.float32(1.0) / power)
    return np.concatenate(parts).astype(np.float32)


def rope_frequencies(pos_L3: np.ndarray, axes_dim: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [1, L, sum(axes_dim) / 2] float32, for the integer positions [L, 3] (`positions`);
    pairs of `layers.apply_rope` (interleaved, as diffusers' complex `apply_rotary_emb_qwen`)."""
    axis_of = np.concatenate([np.full(d // 2, i) for i, d in enumerate(axes_dim)])
    pos = jnp.asarray(pos_L3, jnp.float32)[:, axis_of]  # [L, P], exact: |position| < 2**24
    angles = pos * jnp.asarray(omega(axes_dim, theta))
    return jnp.cos(angles)[None], jnp.sin(angles)[None]
