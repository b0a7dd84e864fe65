"""The attention dispatcher and its memory-bounded / kernel paths against XLA attention."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.models import attention as A


def qkv(b, l, h, d, s=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    s = s or l
    return (
        jnp.asarray(rng.standard_normal((b, l, h, d)), dtype),
        jnp.asarray(rng.standard_normal((b, s, h, d)), dtype),
        jnp.asarray(rng.standard_normal((b, s, h, d)), dtype),
    )


@pytest.mark.parametrize("lq,lk,cq,ck", [(300, 300, 64, 128), (77, 200, 32, 48), (128, 128, 128, 128)])
def test_chunked_matches_xla(lq, lk, cq, ck):
    q, k, v = qkv(2, lq, 3, 16, lk)
    ref = A.dot_product_attention(q, k, v, impl="xla")
    out = A.chunked_attention(q, k, v, q_chunk=cq, k_chunk=ck)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=0)


def test_chunked_with_padding_mask_and_gradient():
    q, k, v = qkv(2, 90, 2, 8)
    rng = np.random.default_rng(1)
    mask = jnp.asarray(rng.random((2, 1, 90, 90)) > 0.4).at[..., 0].set(True)
    f = lambda impl: lambda q, k, v: (A.dot_product_attention(q, k, v, mask_BHLS=mask, impl=impl) ** 2).sum()  # noqa: E731
    np.testing.assert_allclose(
        np.asarray(A.chunked_attention(q, k, v, mask_BHLS=mask, q_chunk=32, k_chunk=32)),
        np.asarray(A.dot_product_attention(q, k, v, mask_BHLS=mask, impl="xla")),
        atol=2e-6,
    )
    g_ref = jax.grad(f("xla"), argnums=(0, 1, 2))(q, k, v)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(A, "Q_CHUNK", 32)
        mp.setattr(A, "K_CHUNK", 32)
        g = jax.grad(f("chunked"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_rows_matches_xla_with_a_mask_padding_and_gradient():
    """The CPU path (`rows`, auto on CPU): query chunks that do not divide the length, a dense mask, forward
    and gradients against xla."""
    q, k, v = qkv(2, 90, 2, 8, 70)
    mask = jnp.asarray(np.random.default_rng(1).random((2, 1, 90, 70)) > 0.4).at[..., 0].set(True)
    f = lambda fn: lambda q, k, v: (fn(q, k, v) ** 2).sum()  # noqa: E731
    rows = lambda q, k, v: A.row_attention(q, k, v, mask_BHLS=mask, q_chunk=32)  # noqa: E731
    xla = lambda q, k, v: A.dot_product_attention(q, k, v, mask_BHLS=mask, impl="xla")  # noqa: E731
    np.testing.assert_allclose(np.asarray(rows(q, k, v)), np.asarray(xla(q, k, v)), atol=2e-6)
    for a, b in zip(jax.grad(f(rows), (0, 1, 2))(q, k, v), jax.grad(f(xla), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_chunked_never_builds_full_scores():
    """At 8,704 tokens the chunked path's largest temporary is far below one [B,H,L,L] f32 matrix."""
    s = jax.ShapeDtypeStruct((1, 8704, 24, 128), jnp.bfloat16)
    full = 1 * 24 * 8704 * 8704 * 4
    compiled = jax.jit(lambda q, k, v: A.chunked_attention(q, k, v)).lower(s, s, s).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < full / 10, (temp, full)


def test_splash_kernel_in_interpreter_matches_xla():
    q, k, v = qkv(1, 256, 2, 64)
    out = A.dot_product_attention(q, k, v, impl="splash_interpret")
    np.testing.assert_allclose(np.asarray(out), np.asarray(A.dot_product_attention(q, k, v, impl="xla")), atol=2e-6)


def test_splash_pads_any_length_and_masks_the_padding():
    """A length that is no multiple of the 128-token blocks (a Kontext edit at 880x1184 has 512 + 2 x 4,070
    tokens) is padded; the padded keys are masked by segment ids: forward and gradients equal XLA's."""
    q, k, v = qkv(2, 150, 2, 16, seed=3)
    f = lambda impl: lambda q, k, v: (A.dot_product_attention(q, k, v, impl=impl) ** 2).sum()  # noqa: E731
    np.testing.assert_allclose(
        np.asarray(A.dot_product_attention(q, k, v, impl="splash_interpret")),
        np.asarray(A.dot_product_attention(q, k, v, impl="xla")),
        atol=2e-6,
    )
    for a, b in zip(jax.grad(f("splash_interpret"), (0, 1, 2))(q, k, v), jax.grad(f("xla"), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("mesh_shape,batch", [((1, 2, 2), 2), ((1, 4, 1), 1)], ids=["fsdp2xtp2", "fsdp4-batch1"])
def test_splash_runs_per_device_under_shard_map(mesh_shape, batch):
    """Under a mesh the kernel runs inside shard_map (a Mosaic kernel cannot be partitioned): batch over
    data/fsdp, heads over tensor; a batch too small for fsdp splits the heads instead. Equal to XLA's on
    fake CPU devices (the kernel in the Pallas interpreter), forward and gradients."""
    from jax.sharding import Mesh

    from jaxedit.parallel import sharding as sh

    mesh = Mesh(np.asarray(jax.devices()[: np.prod(mesh_shape)]).reshape(mesh_shape), sh.MESH_AXES)
    q, k, v = qkv(batch, 130, 4, 16, seed=5)
    loss = lambda impl: lambda q, k, v: (A.dot_product_attention(q, k, v, impl=impl) ** 2).sum()  # noqa: E731
    f = lambda impl: jax.jit(jax.value_and_grad(loss(impl), (0, 1, 2)))  # noqa: E731  (as a train step takes it)
    with sh.activate(mesh):
        axes = A.mesh_axes_for(batch, 4)
        jaxpr = str(jax.make_jaxpr(f("splash_interpret"))(q, k, v))
        got = f("splash_interpret")(q, k, v)
    want = f("xla")(q, k, v)
    assert "shard_map" in jaxpr
    assert axes == ((("fsdp",), ("tensor",)) if batch == 2 else ((), ("fsdp",)))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_splash_lowers_for_tpu_without_hardware():
    s = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    exported = jax.export.export(jax.jit(lambda q, k, v: A.splash_attention(q, k, v)), platforms=["tpu"])(s, s, s)
    assert "tpu_custom_call" in exported.mlir_module()


def test_dispatch_and_fallbacks():
    short = qkv(1, 64, 2, 16)
    long = jax.ShapeDtypeStruct((1, A.AUTO_CHUNK_FROM, 2, 16), jnp.float32)
    assert A.resolve("auto", *short[:2], platform="cpu") == "rows"
    assert A.resolve("auto", long, long, platform="cpu") == "rows"
    assert A.resolve("auto", *short[:2], platform="rocm") == "xla"
    assert A.resolve("auto", long, long, platform="rocm") == "chunked"
    bf = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    assert A.resolve("auto", bf, bf, platform="tpu") == "splash"
    assert A.resolve("auto", bf, bf, platform="gpu") == "cudnn"
    # kernels that cannot take the input fall back with a warning naming the reason
    mask = jnp.ones((1, 1, 64, 64), bool)
    with pytest.warns(UserWarning, match="dense mask is not supported by the splash path"):
        assert A.resolve("splash", *short[:2], mask) == "xla"
    assert A.splash_problem(*short[:2]) is None  # any length: padded to the kernel's blocks
    with pytest.warns(UserWarning, match="bfloat16 or float16"):
        assert A.resolve("cudnn", long, long) == "chunked"
    odd = jax.ShapeDtypeStruct((1, 64, 2, 20), jnp.bfloat16)
    assert A.cudnn_problem(odd, odd) is not None and "head_dim 20" in A.cudnn_problem(odd, odd)
    with pytest.raises(ValueError, match="not one of"):
        A.resolve("flash9", *short[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert A.resolve("chunked", *short[:2]) == "chunked"


def numpy_attention(q, k, v, q_seg, kv_seg, causal):
    """The definition, in float64: each query attends the keys of its segment (at positions <= its own when
    causal); a query with no such key gets 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, lq, h, d = q.shape
    out = np.zeros_like(q)
    for i in range(b):
        for t in range(lq):
            keep = kv_seg[i] == q_seg[i, t]
            if causal:
                keep &= np.arange(k.shape[1]) <= t
            if not keep.any():
                continue
            s = np.einsum("hd,khd->hk", q[i, t], k[i, keep]) / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[i, t] = np.einsum("hk,khd->hd", p / p.sum(-1, keepdims=True), v[i, keep])
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["windows", "causal+masked-keys"])
def test_segment_ids_and_causal_on_every_path(causal):
    """Segment ids (Qwen2.5-VL's vision windows and packed images; a language model's masked keys) and
    causality, as xla, chunked (blocks smaller than the segments and across them), rows and splash (in the
    interpreter; 150 tokens pad to two blocks) compute them: forward against the definition, gradients
    against xla's."""
    q, k, v = qkv(2, 150, 2, 16, seed=7)
    rng = np.random.default_rng(8)
    if causal:  # one segment, some keys masked out with an id no query has
        q_seg = np.zeros((2, 150), np.int32)
        kv_seg = np.where(rng.random((2, 150)) < 0.2, -1, 0).astype(np.int32)
        kv_seg[:, 0] = 0
    else:  # windows of uneven lengths, different per row
        q_seg = np.stack([np.repeat(np.arange(5), [40, 7, 64, 1, 38]), np.repeat(np.arange(3), [100, 20, 30])])
        kv_seg = q_seg.copy()
    seg = (jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32))
    want = numpy_attention(q, k, v, q_seg, kv_seg, causal)

    def attend(impl, q, k, v):
        return A.dot_product_attention(q, k, v, impl=impl, segment_ids=seg, causal=causal)

    loss = lambda impl: lambda q, k, v: (attend(impl, q, k, v) ** 2).sum()  # noqa: E731
    grads = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(A, "Q_CHUNK", 32)
        mp.setattr(A, "K_CHUNK", 48)
        mp.setattr(A, "ROW_CHUNK", 32)
        for impl in ("xla", "chunked", "rows", "splash_interpret"):
            out = attend(impl, q, k, v)
            np.testing.assert_allclose(np.asarray(out), want, atol=3e-6, err_msg=impl)
            grads[impl] = jax.grad(loss(impl), (0, 1, 2))(q, k, v)
    for impl in ("chunked", "rows", "splash_interpret"):
        for a, b in zip(grads[impl], grads["xla"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=impl)
    with pytest.warns(UserWarning, match="segment ids / causal masks are not wired to the cudnn path"):
        bf = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
        assert A.resolve("cudnn", bf, bf, segments=True) == "xla"
