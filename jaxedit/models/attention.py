"""The one attention function every jaxedit model calls, dispatching to a kernel.

Inputs are `[B, L, H, D]` (batch, length, heads, head dim), as
`jax.nn.dot_product_attention` takes them; logits and softmax are float32 whatever the
input dtype; the output has the input dtype. Implementations (`impl`):

  xla      jax.nn.dot_product_attention (XLA): materialises the [B, H, L, S] scores.
  chunked  pure-JAX flash-style attention: query chunks x key chunks with an online
           softmax, float32 accumulators; memory O(B H Cq Ck) instead of O(B H L S).
           Every platform; rematerialised in the backward pass.
  rows     query chunks, each with an exact softmax over all keys (memory O(B H Cq S)),
           heads leading, normalised after the second matmul, each chunk rematerialised
           in the backward pass: what XLA:CPU runs fastest (at 1,664 tokens, 12 heads of 64:
           2.1x xla's forward and 1.5x its forward + backward; benchmarks/attention.py).
  cudnn    jax.nn.dot_product_attention(implementation="cudnn"): fused flash attention
           on NVIDIA GPUs (bfloat16/float16, head_dim a multiple of 8 up to 128).
  splash   Pallas splash attention on TPU (jax.experimental.pallas.ops.tpu); lengths are
           padded to its 128-token blocks, the padded keys masked out by segment ids;
           `splash_interpret` runs the same kernel in the Pallas interpreter (any platform;
           slow; used by the tests on CPU).
Masks: `mask_BHLS` (a dense boolean mask: xla and chunked only), `segment_ids` = (q [B, L],
kv [B, S]) int32 (a query attends only keys of its own segment id: windows, packed images, keys
masked out by an id no query has) and `causal` (keys at positions <= the query's; L == S). Segment
ids and causality are never expanded to an [L, S] array except on the xla path: chunked builds
each block's mask from them, splash takes them as its SegmentIds / CausalMask; cudnn falls back.

  auto     splash on TPU, cudnn on GPU, rows on CPU, otherwise xla for short sequences and
           chunked from `AUTO_CHUNK_FROM` tokens on. The platform is that of the devices the program
           is compiled for (the mesh set with `jax.set_mesh`), else the default backend: a
           program compiled ahead of time for TPU chips from a CPU host gets splash.

The kernels (splash, cudnn) cannot be partitioned by XLA (a Mosaic kernel is opaque), so under
a mesh they run per device inside `jax.shard_map`: batch split over the mesh axes the logical
rules give `act_batch` (data, fsdp), heads over those of `act_heads` (tensor); an axis that
does not divide its dimension is used for the other one if it can, else the data is replicated
along it. A kernel that cannot take the shapes, dtype or mask falls back to `chunked` (or
`xla` for short sequences) with a warning naming the reason. On this project's CPU CI the
kernels are compiled for TPU targets (libtpu, ahead of time) and splash's numerics are tested
through the Pallas interpreter, also under shard_map on fake devices.
"""

from __future__ import annotations

import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

IMPLEMENTATIONS = ("auto", "xla", "chunked", "rows", "cudnn", "splash", "splash_interpret")
AUTO_CHUNK_FROM = 4096  # sequence length from which `auto` avoids the full score matrix
Q_CHUNK, K_CHUNK = 512, 1024
ROW_CHUNK = 256  # queries per chunk of `rows` (exact softmax over all keys)
SPLASH_BLOCK = 128


def dot_product_attention(
    q_BLHD: jax.Array,
    k_BSHD: jax.Array,
    v_BSHD: jax.Array,
    *,
    mask_BHLS: jax.Array | None = None,
    impl: str = "auto",
    bias_BHLS: jax.Array | None = None,
    scale: float | None = None,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    causal: bool = False,
) -> jax.Array:
    """softmax(q k^T * scale [+ bias] [masked]) v  ->  [B, L, H, D]; scale defaults to 1/sqrt(D).

    bias_BHLS (added to the float32 logits, broadcastable to [B, H, L, S]) and an explicit
    `scale` (T5: relative position bias, no scaling) run on the xla path whatever `impl` says.
    segment_ids = (q_seg [B, L], kv_seg [B, S]) and `causal`: see the module docstring.
    """
    if causal and q_BLHD.shape[1] != k_BSHD.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q_BLHD.shape[1]} and {k_BSHD.shape[1]}")
    if bias_BHLS is not None or scale is not None:
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")
        mask = dense_mask(mask_BHLS, segment_ids, causal, q_BLHD.shape[1], k_BSHD.shape[1])
        return jax.nn.dot_product_attention(
            q_BLHD, k_BSHD, v_BSHD, bias=bias_BHLS, mask=mask, scale=scale, implementation="xla"
        )
    impl = resolve(impl, q_BLHD, k_BSHD, mask_BHLS, segments=segment_ids is not None or causal)
    if impl == "xla":
        mask = dense_mask(mask_BHLS, segment_ids, causal, q_BLHD.shape[1], k_BSHD.shape[1])
        return jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD, mask=mask, implementation="xla")
    if impl == "chunked":
        return chunked_attention(q_BLHD, k_BSHD, v_BSHD, mask_BHLS=mask_BHLS, segment_ids=segment_ids, causal=causal)
    if impl == "rows":
        return row_attention(q_BLHD, k_BSHD, v_BSHD, mask_BHLS=mask_BHLS, segment_ids=segment_ids, causal=causal)
    if impl == "cudnn":
        return per_device(cudnn_attention, q_BLHD, k_BSHD, v_BSHD)
    kernel = functools.partial(splash_attention, causal=causal, interpret=impl == "splash_interpret")
    return per_device(kernel, q_BLHD, k_BSHD, v_BSHD, *(segment_ids or ()))


def dense_mask(mask_BHLS, segment_ids, causal: bool, lq: int, lk: int):
    """The boolean mask [B or 1, H or 1, L, S] of a dense mask, segment ids and causality (None if none)."""
    mask = mask_BHLS
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        same = q_seg[:, None, :, None] == kv_seg[:, None, None, :]
        mask = same if mask is None else mask & same
    if causal:
        tri = (jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :])[None, None]
        mask = tri if mask is None else mask & tri
    return mask


def target_platform() -> str:
    """The platform of the devices being compiled for: the mesh set with `jax.set_mesh` (also an ahead-of-
    time target such as TPU chips from `jax.experimental.topologies`), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve(impl: str, q, k, mask=None, platform: str | None = None, segments: bool = False) -> str:
    """The implementation actually used for these shapes (warns when falling back); `segments`: segment ids
    or causality are asked for."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLEMENTATIONS}")
    platform = platform or target_platform()
    long = max(q.shape[1], k.shape[1]) >= AUTO_CHUNK_FROM
    fallback = "chunked" if long else "xla"
    if impl == "auto":
        if platform == "tpu" and splash_problem(q, k, mask) is None:
            return "splash"
        if platform in ("gpu", "cuda") and cudnn_problem(q, k, mask, segments) is None:
            return "cudnn"
        if platform == "cpu":
            return "rows"
        return fallback
    problem = None
    if impl == "cudnn":
        problem = cudnn_problem(q, k, mask, segments)
    elif impl in ("splash", "splash_interpret"):
        problem = splash_problem(q, k, mask)
    if problem:
        warnings.warn(f"attention impl {impl!r} cannot run here ({problem}); using {fallback!r}", stacklevel=3)
        return fallback
    return impl


def cudnn_problem(q, k, mask=None, segments: bool = False) -> str | None:
    """Why cuDNN flash attention cannot take these inputs (None if it can)."""
    if mask is not None:
        return "a dense mask is not supported by the cudnn path"
    if segments:
        return "segment ids / causal masks are not wired to the cudnn path"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype} (cudnn needs bfloat16 or float16)"
    d = q.shape[-1]
    if d % 8 or d > 128:
        return f"head_dim {d} (cudnn needs a multiple of 8, at most 128)"
    return None


def splash_problem(q, k, mask=None) -> str | None:
    """Why splash attention cannot take these inputs (None if it can)."""
    if mask is not None:
        return "a dense mask is not supported by the splash path"
    return None


def chunked_attention(
    q, k, v, *, mask_BHLS=None, segment_ids=None, causal=False, q_chunk: int = Q_CHUNK, k_chunk: int = K_CHUNK
):
    """Flash-style attention in pure JAX (online softmax over key chunks), [B, L, H, D].

    mask_BHLS: optional boolean mask broadcastable to [B, H, L, S] (True = attend).
    segment_ids (q [B, L], kv [B, S]) and `causal` are applied per block (see the module docstring).
    Without a dense mask no [L, S]-sized array is built at all. A query with no key to attend gets 0.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    cq, ck = min(q_chunk, lq), min(k_chunk, lk)
    pq, pk = -lq % cq, -lk % ck
    nq, nk = (lq + pq) // cq, (lk + pk) // ck
    scale = 1.0 / math.sqrt(d)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
    q_chunks = pad(q, pq).reshape(b, nq, cq, h, d).swapaxes(0, 1)
    k_chunks = pad(k, pk).reshape(b, nk, ck, h, d).swapaxes(0, 1)
    v_chunks = pad(v, pk).reshape(b, nk, ck, h, d).swapaxes(0, 1)
    key_valid = (jnp.arange(nk * ck) < lk).reshape(nk, ck)
    q_pos, k_pos = jnp.arange(nq * cq).reshape(nq, cq), jnp.arange(nk * ck).reshape(nk, ck)
    if segment_ids is None:
        q_seg, kv_seg = jnp.zeros((nq, b, cq), jnp.int32), jnp.zeros((nk, b, ck), jnp.int32)
    else:
        q_seg = jnp.pad(segment_ids[0].astype(jnp.int32), ((0, 0), (0, pq))).reshape(b, nq, cq).swapaxes(0, 1)
        kv_seg = jnp.pad(segment_ids[1].astype(jnp.int32), ((0, 0), (0, pk))).reshape(b, nk, ck).swapaxes(0, 1)
    if mask_BHLS is None:
        mask_q = jnp.zeros((nq,), bool)  # placeholder scanned alongside the query chunks
    else:
        m = jnp.broadcast_to(mask_BHLS, (b, mask_BHLS.shape[1], lq, lk))
        m = jnp.pad(m, ((0, 0), (0, 0), (0, pq), (0, pk)))
        mask_q = m.reshape(b, m.shape[1], nq, cq, nk, ck).transpose(2, 4, 0, 1, 3, 5)  # [nq, nk, B, M, cq, ck]

    @jax.checkpoint
    def one_query_chunk(args):
        q_c, mask_c, qs_c, qp_c = args  # [B, cq, H, D], [nk, B, M, cq, ck] or a placeholder, [B, cq], [cq]

        def body(carry, kv):
            m_run, l_run, acc = carry
            k_c, v_c, valid_c, user_c, ks_c, kp_c = kv
            s = jnp.einsum("bqhd,bkhd->bhqk", q_c, k_c, preferred_element_type=jnp.float32) * scale
            keep = valid_c[None, None, None, :] if mask_BHLS is None else valid_c[None, None, None, :] & user_c
            if segment_ids is not None:
                keep = keep & (qs_c[:, None, :, None] == ks_c[:, None, None, :])
            if causal:
                keep = keep & (qp_c[:, None] >= kp_c[None, :])[None, None]
            s = jnp.where(keep, s, -jnp.inf)
            m_new = jnp.maximum(m_run, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(jnp.where(jnp.isfinite(m_run), m_run, m_safe) - m_safe)
            l_run = l_run * corr + p.sum(-1)
            pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v_c.dtype), v_c, preferred_element_type=jnp.float32)
            return (m_new, l_run, acc * corr[..., None] + pv), None

        init = (
            jnp.full((b, h, cq), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, cq), jnp.float32),
            jnp.zeros((b, h, cq, d), jnp.float32),
        )
        user = jnp.zeros((nk,), bool) if mask_BHLS is None else mask_c
        (_, l_run, acc), _ = jax.lax.scan(body, init, (k_chunks, v_chunks, key_valid, user, kv_seg, k_pos))
        out = acc / jnp.where(l_run > 0, l_run, 1.0)[..., None]
        return out.transpose(0, 2, 1, 3).astype(q.dtype)  # [B, cq, H, D]

    out = jax.lax.map(one_query_chunk, (q_chunks, mask_q, q_seg, q_pos))  # [nq, B, cq, H, D]
    return out.swapaxes(0, 1).reshape(b, nq * cq, h, d)[:, :lq]


def row_attention(q, k, v, *, mask_BHLS=None, segment_ids=None, causal=False, q_chunk: int | None = None):
    """Exact softmax over all keys for `q_chunk` (default ROW_CHUNK) queries at a time, [B, L, H, D] (the CPU
    path).

    Heads lead ([B, H, ., .]), so both matmuls of a chunk are batched over (B, H); the softmax is normalised
    after the second matmul (on [c, D] instead of [c, S]); each chunk is rematerialised in the backward
    pass, so only one chunk's [B, H, q_chunk, S] scores are alive.
    Masks as `chunked_attention` (a query with no key to attend gets 0)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    c = min(q_chunk or ROW_CHUNK, lq)
    pq = -lq % c
    n = (lq + pq) // c
    q_NBHcD = jnp.pad(q, ((0, 0), (0, pq), (0, 0), (0, 0))).reshape(b, n, c, h, d).transpose(1, 0, 3, 2, 4)
    k_BHSD, v_BHSD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    q_pos = jnp.arange(n * c).reshape(n, c)
    if segment_ids is None:
        q_seg, kv_seg = jnp.zeros((n, b, c), jnp.int32), None
    else:
        q_seg = jnp.pad(segment_ids[0].astype(jnp.int32), ((0, 0), (0, pq))).reshape(b, n, c).swapaxes(0, 1)
        kv_seg = segment_ids[1].astype(jnp.int32)
    if mask_BHLS is None:
        mask_N = jnp.zeros((n,), bool)  # placeholder mapped alongside the query chunks
    else:
        m = jnp.broadcast_to(mask_BHLS, (b, mask_BHLS.shape[1], lq, lk))
        mask_N = jnp.pad(m, ((0, 0), (0, 0), (0, pq), (0, 0))).reshape(b, m.shape[1], n, c, lk).transpose(2, 0, 1, 3, 4)
    scale = 1.0 / math.sqrt(d)

    @jax.checkpoint
    def one_chunk(args):
        q_c, mask_c, qs_c, qp_c = args  # [B, H, c, D], [B, M, c, S] or a placeholder, [B, c], [c]
        s = jnp.einsum("bhqd,bhsd->bhqs", q_c, k_BHSD, preferred_element_type=jnp.float32) * scale
        keep = None if mask_BHLS is None else mask_c
        if segment_ids is not None:
            same = qs_c[:, None, :, None] == kv_seg[:, None, None, :]
            keep = same if keep is None else keep & same
        if causal:
            tri = (qp_c[:, None] >= jnp.arange(lk)[None, :])[None, None]
            keep = tri if keep is None else keep & tri
        if keep is not None:
            s = jnp.where(keep, s, -jnp.inf)
        m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
        p = jnp.exp(s - (m if keep is None else jnp.where(jnp.isfinite(m), m, 0.0)))
        total = p.sum(-1, keepdims=True)
        out = jnp.einsum("bhqs,bhsd->bhqd", p.astype(v_BHSD.dtype), v_BHSD, preferred_element_type=jnp.float32)
        return (out / jnp.where(total > 0, total, 1.0)).astype(q.dtype)  # normalised after: [c, D], not [c, S]

    out = jax.lax.map(one_chunk, (q_NBHcD, mask_N, q_seg, q_pos))  # [N, B, H, c, D]
    return out.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, d)[:, :lq]


def mesh_axes_for(batch: int, heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(batch axes, head axes) of the current mesh for a kernel run per device: the mesh axes the logical
    rules give act_batch and act_heads, each kept only while it divides its dimension; a batch axis that
    cannot split the batch splits the heads instead when it divides them (the devices share the work
    either way). Axes of size 1 are left out."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), ()
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

    def rule_axes(name):
        spec = nn.logical_to_mesh_axes((name,))[0]
        names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return [a for a in names if sizes.get(a, 1) > 1]

    batch_axes, head_axes, left = [], [], []
    for a in rule_axes("act_batch"):
        if batch % (math.prod(sizes[x] for x in batch_axes) * sizes[a]) == 0:
            batch_axes.append(a)
        else:
            left.append(a)
    for a in rule_axes("act_heads") + left:
        if a not in batch_axes and heads % (math.prod(sizes[x] for x in head_axes) * sizes[a]) == 0:
            head_axes.append(a)
    return tuple(batch_axes), tuple(head_axes)


def per_device(kernel, q, k, v, *per_row):
    """`kernel(q, k, v, *per_row)` ([B, L, H, D] each; per_row: [B, ...] arrays such as segment ids) run on
    every device's shard inside `jax.shard_map` when a mesh is set (see `mesh_axes_for`), else directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, *per_row)
    batch_axes, head_axes = mesh_axes_for(q.shape[0], q.shape[2])
    spec = PartitionSpec(batch_axes or None, None, head_axes or None, None)
    row_specs = tuple(PartitionSpec(batch_axes or None, *([None] * (x.ndim - 1))) for x in per_row)
    return jax.shard_map(kernel, in_specs=(spec, spec, spec, *row_specs), out_specs=spec, check_vma=False)(
        q, k, v, *per_row
    )


def cudnn_attention(q, k, v):
    """cuDNN fused flash attention (NVIDIA GPUs), [B, L, H, D]."""
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


PAD_SEGMENT = -(2**30)  # the segment id of keys padded to splash's blocks: no query has it


def splash_attention(q, k, v, q_seg=None, kv_seg=None, *, causal: bool = False, interpret: bool = False):
    """Pallas splash attention (TPU kernel; `interpret=True` runs it anywhere), [B, L, H, D] (one device's
    shard: `dot_product_attention` runs it under `per_device`); q_seg [B, L], kv_seg [B, S]: segment ids.
    Lengths are padded to the kernel's 128-token blocks; padded keys get a segment id no query has, so
    nothing attends them; padded queries repeat the last query's segment (their rows are dropped)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, lq, h, d = q.shape
    lk = k.shape[1]
    pq, pk = -lq % SPLASH_BLOCK, -lk % SPLASH_BLOCK
    kernel = _splash_kernel(lq + pq, lk + pk, h, interpret, causal)
    scale = 1.0 / math.sqrt(d)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x  # noqa: E731
    qt = pad((q.astype(jnp.float32) * scale).astype(q.dtype), pq).transpose(0, 2, 1, 3)  # [B, H, L, D]
    kt, vt = (pad(x, pk).transpose(0, 2, 1, 3) for x in (k, v))
    if q_seg is None and not pk:
        out = jax.vmap(kernel)(qt, kt, vt)
    else:
        if q_seg is None:  # padded queries keep segment 0: their rows attend the real keys, never an empty row
            q_seg, kv_seg = jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, lk), jnp.int32)
        q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, pq)), mode="edge")
        kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, pk)), constant_values=PAD_SEGMENT)
        out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=SegmentIds(qs, ks)))(
            qt, kt, vt, q_seg, kv_seg
        )
    return out.transpose(0, 2, 1, 3)[:, :lq].astype(q.dtype)


def _splash_kernel(lq: int, lk: int, heads: int, interpret: bool, causal: bool = False):
    """The kernel for these sizes, built in the trace that calls it (its mask tables become constants of
    that program; a kernel cached across traces would leak their tracers). About 0.3 s at 8,704 tokens."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    one = (lambda: sa.CausalMask((lq, lk))) if causal else (lambda: sa.FullMask((lq, lk)))
    mask = sa.MultiHeadMask([one() for _ in range(heads)])
    bq = next(b for b in (512, 256, SPLASH_BLOCK) if lq % b == 0)
    bk = next(b for b in (512, 256, SPLASH_BLOCK) if lk % b == 0)
    blocks = sa.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
        block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk,
    )  # fmt: skip
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
