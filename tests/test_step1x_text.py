"""Step1X-Edit's Qwen2.5-VL conditioning (jaxedit.step1x.text) with a tiny random Qwen2.5-VL.

The reference for the numbers is the transformers model run directly on the same token ids
with the 3-D rope positions of the reference's transformers (4.49: text positions count up,
the image grid takes (0, row, col) from the text position, text resumes after max(rows, cols)),
computed here in numpy and passed explicitly; our embedder lets transformers 5 derive them.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from jaxedit.step1x.text import (  # noqa: E402
    CLOSE_QUOTE,
    OPEN_QUOTE,
    PREFIX,
    load_embedding,
    save_embedding,
    smart_resize,
    split_quoted,
)
from references.qwen_torch import TorchQwenEmbedder  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

PROMPTS = [
    'write "Hi" on the sign',
    "make the sky red, add snow to the mountains and turn the old town into a starry night",
]


def image(seed=0, w=90, h=60):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def embedder(tiny_qwen):
    path, cfg = tiny_qwen
    return TorchQwenEmbedder.from_pretrained(path, cfg, dtype="float32")


def test_split_quoted():
    pre = "x" * 156  # quotes count from character 156 on (the system prompt and PREFIX come first)
    assert split_quoted(pre + 'say "Hi" now') == [pre + 'say "', "“H”", "“i”", '" now']
    early = 'a "b" ' + "x" * 150  # quotes before index 156 are plain text; curly quotes become "
    assert split_quoted(early + " “ok”") == [early + ' "', "“o”", "“k”", '"']
    # ' also becomes ": an apostrophe opens a quote that runs to the end (as the reference does)
    assert split_quoted(pre + "cat's hat") == [pre + 'cat"', "“s”", "“ ”", "“h”", "“a”", "“t”"]
    assert split_quoted("no quotes") == ["no quotes"]


@pytest.mark.parametrize("hw", [(60, 90), (512, 512), (768, 1024), (20, 3000), (5000, 4000), (28, 28)])
def test_smart_resize_matches_transformers(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    for lo, hi in ((4 * 28 * 28, 16384 * 28 * 28), (256 * 28 * 28, 324 * 28 * 28)):
        assert smart_resize(*hw, 28, lo, hi) == theirs(*hw, factor=28, min_pixels=lo, max_pixels=hi)
    assert smart_resize(512, 512, 28, 4 * 784, 16384 * 784) == (504, 504)  # qwen_vl_utils, then in the processor's
    assert smart_resize(504, 504, 28, 256 * 784, 324 * 784) == (504, 504)  # [256, 324] x 28^2 bounds


def test_token_ids(embedder):
    """Plain tokenisation up to <|vision_end|> (image pads expanded), re-tokenised quotes after it."""
    cfg, tok = embedder.config, embedder.tokenizer
    ids = [int(i) for i in embedder.prepare_inputs(PROMPTS[0], image())["input_ids"]]
    n_pad = ids.count(embedder.image_token_id)
    chat = embedder.chat_text(PROMPTS[0])
    assert chat.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + PREFIX)
    assert chat.endswith('Picture 1: <|vision_start|><|image_pad|><|vision_end|>write "Hi" on the sign'
                         "<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    plain = tok(chat.replace("<|image_pad|>", "<|image_pad|>" * n_pad))["input_ids"]
    cut = plain.index(embedder.vision_end_id)
    assert ids[:cut] == plain[:cut] and n_pad == 6  # 60x90 -> 56x84 px -> 4x6 patches -> 2x3 tokens
    quoted = []
    for c in "Hi":  # each quoted character alone, its “ ” stripped
        wrapped = tok(OPEN_QUOTE + c + CLOSE_QUOTE)["input_ids"]
        assert wrapped[0] == cfg.quote_ids[0] and wrapped[-1] == cfg.quote_ids[1]
        quoted += wrapped[1:-1]
    want = (
        tok('<|vision_end|>write "')["input_ids"]
        + quoted
        + tok('" on the sign<|im_end|>\n<|im_start|>assistant\n')["input_ids"]
    )
    assert ids[cut:] == want
    assert ids[cut:] != plain[cut:]  # the quotes did change the tokens ("Hi" is one token unquoted)
    # without quotes the ids are the plain tokenisation
    ids2 = [int(i) for i in embedder.prepare_inputs(PROMPTS[1], image())["input_ids"]]
    assert ids2 == tok(embedder.chat_text(PROMPTS[1]).replace("<|image_pad|>", "<|image_pad|>" * n_pad))["input_ids"]


def test_embeddings_equal_the_model_run_directly(embedder):
    cfg, model = embedder.config, embedder.model
    emb, mask = embedder.encode(PROMPTS, [image(0), image(1, 64, 80)])
    assert emb.shape == (2, cfg.max_length, cfg.hidden_size) and emb.dtype == np.float32
    for i, (prompt, img) in enumerate(zip(PROMPTS, [image(0), image(1, 64, 80)])):
        inputs = embedder.prepare_inputs(prompt, img)
        ids = inputs["input_ids"]
        pos = torch.from_numpy(rope_positions(ids, inputs["image_grid_thw"][0], embedder.merge_size, embedder))
        with torch.no_grad():
            out = model(
                input_ids=torch.from_numpy(ids)[None],
                attention_mask=torch.from_numpy((ids > 0).astype(np.int64))[None],
                pixel_values=torch.from_numpy(inputs["pixel_values"]),
                image_grid_thw=torch.from_numpy(inputs["image_grid_thw"]),
                position_ids=pos,
                output_hidden_states=True,
            )
        hidden = out.hidden_states[-1][0].numpy()
        n = min(cfg.max_length, len(ids) - cfg.drop_tokens)
        assert 0 < n and mask[i].tolist() == [1] * n + [0] * (cfg.max_length - n)
        err = rel_err(emb[i, :n], hidden[cfg.drop_tokens : cfg.drop_tokens + n])
        print(f"item {i}: {len(ids)} tokens, kept {n}; rel err vs the model run directly {err:.1e}")
        assert err <= 1e-6
        assert not emb[i, n:].any()
    assert mask[0].sum() < cfg.max_length == mask[1].sum()  # the first is padded, the second truncated


def rope_positions(ids, grid_thw, merge, embedder):
    """[3, 1, L] positions as transformers 4.49's Qwen2.5-VL get_rope_index gives them (one image)."""
    t, gh, gw = (int(v) for v in grid_thw)
    h, w = gh // merge, gw // merge
    pads = np.flatnonzero(ids == embedder.image_token_id)
    first, n = int(pads[0]), len(pads)
    assert n == t * h * w and (np.diff(pads) == 1).all() and (ids > 0).all()  # no masked-out tokens here
    pos = np.zeros((3, len(ids)), np.int64)
    pos[:, :first] = np.arange(first)
    rows, cols = np.divmod(np.arange(n), w)
    pos[:, first : first + n] = first + np.stack([np.zeros(n, np.int64), rows, cols])
    pos[:, first + n :] = first + max(h, w) + np.arange(len(ids) - first - n)
    return pos[:, None, :]


def test_truncation_and_padding_follow_the_config(embedder):
    full, full_mask = embedder.encode(PROMPTS[:1], [image()])
    n = int(full_mask.sum())
    for max_length in (n - 5, n + 7):
        other = TorchQwenEmbedder(
            embedder.model, embedder.tokenizer, embedder.image_processor, embedder.chat_template,
            dataclasses.replace(embedder.config, max_length=max_length),
        )  # fmt: skip
        emb, mask = other.encode(PROMPTS[:1], [image()])
        kept = min(n, max_length)
        assert emb.shape[1] == max_length and int(mask.sum()) == kept
        np.testing.assert_array_equal(emb[0, :kept], full[0, :kept])
        assert not emb[0, kept:].any()


def test_cache_files(embedder, tmp_path, monkeypatch):
    emb, mask = embedder.encode(PROMPTS, [image(0), image(1)], cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 2
    monkeypatch.setattr(embedder, "embed_items", lambda *a: pytest.fail("the cache was not used"))
    emb2, mask2 = embedder.encode(PROMPTS, [image(0), image(1)], cache_dir=tmp_path)
    np.testing.assert_array_equal(emb2, emb)
    np.testing.assert_array_equal(mask2, mask)

    # bfloat16-exact outputs (a bfloat16 model) are stored as bfloat16 bits; others as float32
    import ml_dtypes

    b16 = emb[0].astype(ml_dtypes.bfloat16).astype(np.float32)
    for rows, dtype in ((b16, "bfloat16"), (emb[0], "float32")):
        path = save_embedding(tmp_path / f"{dtype}.npz", rows, mask[0])
        with np.load(path) as f:
            assert str(f["dtype"]) == dtype and len(f["embeddings"]) == mask[0].sum()
        back, back_mask = load_embedding(path)
        np.testing.assert_array_equal(back, rows)
        np.testing.assert_array_equal(back_mask, mask[0])
    with pytest.raises(ValueError, match="prefix mask"):
        save_embedding(tmp_path / "bad.npz", emb[0], np.roll(mask[0], 1))


def test_library_imports_no_torch():
    code = (
        "import sys, jaxedit.kontext.text, jaxedit.step1x.text, jaxedit.kontext.pipeline, jaxedit.step1x.pipeline, "
        "jaxedit.model_folder, jaxedit.pipelines.auto, jaxedit.cli, jaxedit.train.loop; "
        "from jaxedit.step1x.text import Step1XQwenEmbedder; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})


def test_jax_embedder_matches_the_torch_path(embedder, tiny_qwen):
    """The JAX embedder (the same folder's weights converted as read, no torch) runs both items in one padded
    batch (images of different sizes, one prompt with quoted text) against the PyTorch path item by item:
    identical masks, embeddings <= 1e-5 in float32; in bfloat16, within twice transformers' own bfloat16
    error (both against the float32 PyTorch path)."""
    from checkpoints_convert.step1x import qwen_embedder

    path, cfg = tiny_qwen
    imgs = [image(0), image(1, 64, 80)]
    want, want_mask = embedder.encode(PROMPTS, imgs)
    ours = qwen_embedder(path, cfg, dtype="float32", attention_impl="xla")
    emb, mask = ours.encode(PROMPTS, imgs)
    np.testing.assert_array_equal(mask, want_mask)
    err = rel_err(emb, want)
    print(f"JAX embedder vs the PyTorch path, float32, 2 items batched: rel err {err:.1e}")
    assert err <= 1e-5
    ours16 = qwen_embedder(path, cfg, dtype="bfloat16", attention_impl="xla")
    theirs16 = TorchQwenEmbedder.from_pretrained(path, cfg, dtype="bfloat16")
    e16, m16 = ours16.encode(PROMPTS, imgs)
    t16, _ = theirs16.encode(PROMPTS, imgs)
    ours_err, their_err = rel_err(e16, want), rel_err(t16, want)
    print(f"bfloat16 vs float32: ours {ours_err:.2e}, transformers {their_err:.2e}")
    np.testing.assert_array_equal(m16, want_mask)
    assert 0 < ours_err <= 2 * their_err


def test_sharded_jax_embedder_equals_one_device(tiny_qwen):
    """On a data=2 x fsdp=2 mesh (weights split by fsdp, the three items padded to four rows and split over
    the batch axes): the same embeddings and masks as on one device."""
    import jax

    from checkpoints_convert.step1x import qwen_embedder
    from jaxedit.parallel import sharding as sh

    path, cfg = tiny_qwen
    imgs, prompts = [image(0), image(1, 64, 80), image(2, 40, 40)], [*PROMPTS, "x"]
    one = qwen_embedder(path, cfg, dtype="float32", attention_impl="xla")
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    sharded = qwen_embedder(path, cfg, dtype="float32", attention_impl="xla", mesh=mesh)
    leaf = sharded.params["language_model"]["layers"]["q_proj"]["kernel"]
    assert leaf.sharding.spec[1] == "fsdp"
    (emb, mask), (want, want_mask) = sharded.encode(prompts, imgs), one.encode(prompts, imgs)
    np.testing.assert_array_equal(mask, want_mask)
    assert rel_err(emb, want) <= 1e-6
