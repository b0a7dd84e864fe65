"""Text generation with the JAX Qwen2.5-VL (`jaxedit.models.qwen2_5_vl.QwenVL`): a key / value cache, the prefill
of the images and prompts and the decoding loop in one jitted program.

Layout: prompts are LEFT-padded to a common length L (their last tokens share slot L - 1), so generated token t of
every row goes to the same cache slot L + t (one `dynamic_update_slice` for the batch). Padding slots are never keys.
Positions follow transformers' `get_rope_index` per row over its unmasked tokens (`rope_positions`); generated token
t of a row has the position max(its prompt's positions) + 1 + t on all three rope axes (transformers' rope delta:
after an image the text positions run on from the image's grid, not from the token count).

The loop is a `lax.while_loop` over at most `max_new_tokens` steps that stops early once every row has produced a
stop token; a finished row emits `pad_id` from then on. Its token ids [B, max_new_tokens] and lengths [B] (tokens
up to and including the stop token) come back, and optionally the float32 logits each token was chosen from
(transformers' `output_logits`). Decoding: greedy (temperature 0) or sampling with temperature and top-p (nucleus)
from a seed (`jax.random`; the same seed and inputs give the same tokens).

On a mesh the weights are sharded by the logical rules as the encoder's (`QwenVLEncoder`), the prompts' rows split
over the batch axes and the cache [layers, B, T, kv_heads, head_dim] with them, its heads with the query heads
where the tensor axis divides them (`qwen2_5_vl.kv_cache_names`).

`generate(params, cfg, items, max_new_tokens, ...)` takes prepared items (input_ids, attention_mask, pixel_values,
image_grid_thw: the processor's outputs, as `jaxedit.qwen_vl.QwenVLEncoder`); `generate_chat(...)` takes prompts and
images through the tokenizer's chat template and the Qwen2-VL image processor and returns the decoded texts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.configs import QwenVLConfig
from jaxedit.models.qwen2_5_vl import QwenVL, kv_cache_names, prepare_vision, rope_positions
from jaxedit.parallel.sharding import constrain

TOKEN_BUCKET, UNIT_BUCKET = 16, 16  # prompt tokens; merged image patches: one compiled program per bucket


@dataclasses.dataclass
class Generated:
    """tokens [B, max_new_tokens] int32 (`pad_id` after a row's stop token), lengths [B] (tokens up to and
    including the stop token), logits [B, max_new_tokens, vocab] float32 (with return_logits; undefined after a
    row's stop)."""

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None = None

    def rows(self) -> list[list[int]]:
        """Each row's generated ids (up to and including its stop token)."""
        return [list(map(int, t[:n])) for t, n in zip(self.tokens, self.lengths)]


def bucket(n: int, step: int) -> int:
    return -(-n // step) * step


def prompt_positions(ids: np.ndarray, mask: np.ndarray, grid_thw, cfg: QwenVLConfig) -> np.ndarray:
    """[3, L] rope positions of one left-padded row: over its unmasked tokens as transformers' `get_rope_index`
    (text-only rows: 0, 1, ... over the unmasked tokens), masked tokens 0."""
    keep = np.asarray(mask).astype(bool)
    if len(grid_thw):
        return rope_positions(ids, mask, grid_thw, cfg)
    pos = np.zeros(len(ids), np.int32)
    pos[keep] = np.arange(int(keep.sum()))
    return np.broadcast_to(pos, (3, len(ids))).astype(np.int32)


def batch_inputs(items: Sequence[dict[str, Any]], cfg: QwenVLConfig, *, rows: int = 1, token_bucket=TOKEN_BUCKET):
    """Left-padded model inputs of prepared items: dict of ids [B, L], mask [B, L], positions [3, B, L], next
    position [B] (of the first generated token), vision (or None), feature_index [B, L]; B a multiple of `rows`
    (empty rows: one masked token each), L a multiple of `token_bucket`."""
    n = len(items)
    lens = [len(x["input_ids"]) for x in items]
    b, length = bucket(n, rows), bucket(max(lens), token_bucket)
    ids, mask = np.zeros((b, length), np.int32), np.zeros((b, length), np.int32)
    pos = np.zeros((3, b, length), np.int32)
    next_pos = np.zeros(b, np.int32)
    grids = []
    for i, x in enumerate(items):
        at = length - lens[i]
        ids[i, at:] = x["input_ids"]
        mask[i, at:] = x["attention_mask"] if "attention_mask" in x else 1
        g = np.asarray(x.get("image_grid_thw", np.zeros((0, 3))), np.int64).reshape(-1, 3)
        grids.append(g)
        pos[:, i] = prompt_positions(ids[i], mask[i], g, cfg)
        next_pos[i] = pos[:, i][:, mask[i].astype(bool)].max() + 1 if mask[i].any() else 0
    vision, feature_index = None, np.full((b, length), -1, np.int32)
    if any(len(g) for g in grids):
        grid = np.concatenate(grids)
        units = int(sum(np.prod(g) for g in grid)) // cfg.vision.spatial_merge_size**2
        pixels = np.concatenate([np.asarray(x["pixel_values"], np.float32) for x, g in zip(items, grids) if len(g)])
        vision = prepare_vision(pixels, grid, cfg.vision, pad_to=bucket(units, UNIT_BUCKET))
        pads = ids == cfg.image_token_id
        if int(pads.sum()) != units:
            raise ValueError(f"{int(pads.sum())} image-pad tokens for {units} image features")
        feature_index[pads] = vision.pop("inverse")
    return {"ids": ids, "mask": mask, "positions": pos, "next_pos": next_pos, "vision": vision,
            "feature_index": feature_index, "n": n}  # fmt: skip


def top_p_filter(logits_BV: jax.Array, top_p) -> jax.Array:
    """Logits outside the smallest set of most likely tokens whose probability reaches `top_p` -> -inf (the most
    likely token always stays)."""
    order = jnp.argsort(-logits_BV, axis=-1)
    sorted_logits = jnp.take_along_axis(logits_BV, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    keep_sorted = before < top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits_BV.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits_BV, -jnp.inf)


def choose(logits_BV, key, temperature, top_p, greedy: bool):
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    scaled = top_p_filter(logits_BV / temperature, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def decoder(cfg: QwenVLConfig, dtype: str, max_new_tokens: int, greedy: bool, return_logits: bool,
            attention_impl: str = "auto"):  # fmt: skip
    """The jitted program: (params, ids, mask, positions, next_pos, vision, feature_index, stop_ids, pad_id,
    temperature, top_p, seed) -> (tokens, lengths, logits or None). attention_impl: the vision tower's and the
    prefill's (the prompt's tokens over each other: splash on TPU); a decoding step's attention over the cache is
    XLA's with a dense mask."""
    model = QwenVL(cfg, dtype=jnp.dtype(dtype), attention_impl=attention_impl, kv_cache=True)
    text, vocab = cfg.text, cfg.text.vocab_size

    def run(params, ids, mask, positions, next_pos, vision, feature_index, stop_ids, pad_id, temperature, top_p, seed):
        b, length = ids.shape
        slots = length + max_new_tokens - 1  # the last token is chosen, never fed
        shape = (text.num_layers, b, slots, text.num_kv_heads, text.head_dim)
        names = kv_cache_names(text.num_kv_heads)
        cache = tuple(constrain(jnp.zeros(shape, jnp.dtype(dtype)), names) for _ in range(2))
        keys = jnp.concatenate([mask.astype(bool), jnp.ones((b, max_new_tokens - 1), bool)], axis=1)
        key = jax.random.key(seed)
        apply = functools.partial(model.apply, {"params": params}, method=QwenVL.decode)
        logits, cache = apply(ids, positions, keys, cache, 0, vision, feature_index)

        def emit(state, logits):
            t, tokens, done, lengths, all_logits = state
            tok = choose(logits, jax.random.fold_in(key, t), temperature, top_p, greedy)
            tok = jnp.where(done, pad_id, tok)
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | jnp.isin(tok, stop_ids)
            tokens = tokens.at[:, t].set(tok)
            if return_logits:
                all_logits = all_logits.at[:, t].set(logits)
            return tok, tokens, done, lengths, all_logits

        tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
        all_logits = jnp.zeros((b, max_new_tokens, vocab), jnp.float32) if return_logits else jnp.zeros(())
        zero = jnp.zeros((), jnp.int32)
        first = (zero, tokens, jnp.zeros(b, bool), jnp.zeros(b, jnp.int32), all_logits)
        tok, tokens, done, lengths, all_logits = emit(first, logits)

        def cond(state):
            t, done = state[0], state[3]
            return (t < max_new_tokens) & ~jnp.all(done)

        def body(state):
            t, tok, tokens, done, lengths, all_logits, cache = state
            pos = jnp.broadcast_to(next_pos + t - 1, (3, b))[:, :, None]
            logits, cache = apply(tok[:, None], pos, keys, cache, length + t - 1)
            tok, tokens, done, lengths, all_logits = emit((t, tokens, done, lengths, all_logits), logits)
            return t + 1, tok, tokens, done, lengths, all_logits, cache

        state = (zero + 1, tok, tokens, done, lengths, all_logits, cache)
        _, _, tokens, _, lengths, all_logits, _ = jax.lax.while_loop(cond, body, state)
        return tokens, lengths, all_logits if return_logits else None

    return jax.jit(run)


def generate(
    params, cfg: QwenVLConfig, items: Sequence[dict[str, Any]], max_new_tokens: int, *,
    stop_ids: Sequence[int] = (), pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
    dtype: str = "float32", mesh=None, return_logits: bool = False, attention_impl: str = "auto",
) -> Generated:  # fmt: skip
    """Generate up to `max_new_tokens` after each prepared item (input_ids [L], attention_mask [L] optional,
    pixel_values [N, patch_dim] and image_grid_thw [n, 3] for items with images), all items in one batch.

    temperature 0: greedy; otherwise sampling at `temperature` from the top-p nucleus with `seed`. A row stops at
    its first token in `stop_ids` (kept, counted in its length) and is padded with `pad_id` after it. mesh: the
    weights sharded by the logical rules (pass them already placed, or they are put there), the rows split over the
    batch axes (padded with empty rows to a multiple of them)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    rows = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    batch = batch_inputs(items, cfg, rows=rows)
    greedy = temperature == 0
    fn = decoder(cfg, str(jnp.dtype(dtype)), int(max_new_tokens), greedy, bool(return_logits), attention_impl)
    stops = np.asarray(list(stop_ids) or [-1], np.int32)
    scalars = (np.int32(pad_id), np.float32(temperature or 1.0), np.float32(top_p), np.uint32(seed))
    args = [batch[k] for k in ("ids", "mask", "positions", "next_pos", "vision", "feature_index")]
    if mesh is None:
        out = fn(params, *args, stops, *scalars)
    else:
        out = run_on_mesh(fn, params, cfg, args, (stops, *scalars), mesh)
    tokens, lengths, logits = jax.device_get(out)
    n = batch["n"]
    return Generated(np.asarray(tokens)[:n], np.asarray(lengths)[:n], None if logits is None else logits[:n])


def place_params(params, cfg: QwenVLConfig, mesh):
    """`params` sharded over `mesh` by the logical rules (the encoder's placement)."""
    from jaxedit.models.qwen2_5_vl import abstract_params
    from jaxedit.parallel import sharding as sh

    return jax.device_put(params, sh.shardings(abstract_params(cfg, boxed=True), mesh))


def run_on_mesh(fn, params, cfg, args, rest, mesh):
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxedit.parallel import sharding as sh

    ids, mask, pos, next_pos, vision, index = args
    batch = lambda x: jax.device_put(x, sh.batch_sharding(mesh, x.ndim))  # noqa: E731
    by_row = NamedSharding(mesh, PartitionSpec(None, *sh.batch_sharding(mesh, 2).spec))
    params = place_params(params, cfg, mesh)
    with sh.activate(mesh):
        return fn(params, batch(ids), batch(mask), jax.device_put(pos, by_row), batch(next_pos), vision,
                  batch(index), *rest)  # fmt: skip


def lower_generate(cfg: QwenVLConfig, mesh, batch: int, *, prompt_tokens: int, image_units: int, new_tokens: int,
                   attention_impl: str = "auto"):  # fmt: skip
    """The generation program (bfloat16 weights, compute and cache; greedy) lowered on abstract inputs sharded
    over `mesh`: `batch` prompts of `prompt_tokens` tokens holding `image_units` image features in all (their
    patches one packed, replicated row), `new_tokens` generated. Returns (jax.stages.Lowered, figures)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxedit.models.qwen2_5_vl import abstract_params
    from jaxedit.parallel import sharding as sh

    params = sh.abstract_with_shardings(abstract_params(cfg, jnp.bfloat16, boxed=True), mesh)
    fn = decoder(cfg, "bfloat16", int(new_tokens), True, False, attention_impl)
    rep = NamedSharding(mesh, PartitionSpec())
    arr = lambda shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt, sharding=sh.batch_sharding(mesh, len(shape)))  # noqa: E731
    one = lambda shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt, sharding=rep)  # noqa: E731
    patches = image_units * cfg.vision.spatial_merge_size**2
    vision = None
    if image_units:
        vision = {"patches": one((1, patches, cfg.vision.patch_dim), jnp.bfloat16), "pos": one((1, patches, 2)),
                  "seg_image": one((1, patches)), "seg_window": one((1, patches))}  # fmt: skip
    by_row = NamedSharding(mesh, PartitionSpec(None, *sh.batch_sharding(mesh, 2).spec))
    length = prompt_tokens
    ids, mask, index = (arr((batch, length)) for _ in range(3))
    pos = jax.ShapeDtypeStruct((3, batch, length), jnp.int32, sharding=by_row)
    scalars = (one((1,)), one(()), one((), jnp.float32), one((), jnp.float32), one((), jnp.uint32))
    with sh.activate(mesh):
        lowered = fn.lower(params, ids, mask, pos, arr((batch,)), vision, index, *scalars)
    t = cfg.text
    cache = 2 * t.num_layers * batch * (length + new_tokens - 1) * t.num_kv_heads * t.head_dim * 2
    return lowered, {"prompt_tokens": length, "image_features": image_units, "new_tokens": new_tokens,
                     "kv_cache_bytes": cache}  # fmt: skip


# ----------------------------------------------------------------------------------------
# prompts and images


def chat_items(tokenizer, image_processor, prompts: Sequence[str], images: Sequence[Any], *, chat_template=None,
               system: str | None = None, text_first: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Prepared items of (prompt, images) pairs as transformers' Qwen2.5-VL processor makes them: the chat
    template (one user turn: the images, then the text, or the text first with `text_first`; the generation prompt
    added), each `<|image_pad|>` expanded to its image's merged patches, the Qwen2-VL image processor's pixel values
    [N, patch_dim] and grids [n_images, 3] (images in order). An item's images: one image, a list of them, or
    None."""
    items = []
    for prompt, image in zip(prompts, images, strict=True):
        imgs = [] if image is None else list(image) if isinstance(image, list | tuple) else [image]
        content = [{"type": "image"} for _ in imgs]
        text_part = [{"type": "text", "text": prompt}]
        content = text_part + content if text_first else content + text_part
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        kw = {"chat_template": chat_template} if chat_template else {}
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)
        item: dict[str, Any] = {}
        if imgs:
            vision = image_processor(images=imgs, return_tensors="np")
            grids = np.asarray(vision["image_grid_thw"], np.int64).reshape(-1, 3)
            pad, mark = "<|image_pad|>", "\x00image\x00"
            for g in grids:  # one pad per image, in order: each expanded to its own image's merged patches
                text = text.replace(pad, mark * (int(np.prod(g)) // image_processor.merge_size**2), 1)
            text = text.replace(mark, pad)
            item["pixel_values"] = np.asarray(vision["pixel_values"], np.float32)
            item["image_grid_thw"] = grids
        ids = np.asarray(tokenizer(text)["input_ids"], np.int64)
        items.append({"input_ids": ids, "attention_mask": np.ones(len(ids), np.int32), **item})
    return items


def generate_chat(params, cfg: QwenVLConfig, tokenizer, image_processor, prompts, images, max_new_tokens: int,
                  *, chat_template=None, **kw) -> list[str]:  # fmt: skip
    """Answers (decoded, special tokens skipped) to `prompts` about `images` (per prompt: an image, a list of
    images or None; kw `text_first`: the text before the images); stop tokens
    default to the tokenizer's end of turn (<|im_end|>) and end of text; kw: `generate`'s."""
    items = chat_items(
        tokenizer, image_processor, prompts, images, chat_template=chat_template, text_first=kw.pop("text_first", False)
    )
    stops = kw.pop("stop_ids", None)
    if stops is None:
        stops = sorted({i for i in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) if i is not None})
    pad = kw.pop("pad_id", tokenizer.pad_token_id or 0)
    out = generate(params, cfg, items, max_new_tokens, stop_ids=stops, pad_id=pad, **kw)
    return tokenizer.batch_decode(out.rows(), skip_special_tokens=True)


__all__ = ["Generated", "batch_inputs", "chat_items", "generate", "generate_chat", "lower_generate", "top_p_filter"]
