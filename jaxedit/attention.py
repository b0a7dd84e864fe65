"""The one attention function every jaxedit model calls.

Inputs are `[B, L, H, D]` (batch, length, heads, head dim), as
`jax.nn.dot_product_attention` takes them. Logits and softmax are computed in
float32 whatever the input dtype; the output has the input dtype. Later kernels
(cuDNN, Pallas splash/flash on TPU, chunked attention) plug in here by `impl`.
"""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("xla",)


def dot_product_attention(
    q_BLHD: jax.Array,
    k_BSHD: jax.Array,
    v_BSHD: jax.Array,
    *,
    mask_BHLS: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """softmax(q k^T / sqrt(D) [masked]) v  ->  [B, L, H, D]."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")
    return jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD, mask=mask_BHLS, implementation="xla")
