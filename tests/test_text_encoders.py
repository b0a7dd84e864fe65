"""T5 encoder and CLIP text tower: converters on the full-size manifests, parity against
transformers (random weights, saved with save_pretrained, converted with our loaders),
and FluxTextEncoder end to end against diffusers' FluxPipeline prompt-embedding code.

Tokenizers are trained offline here on a few sentences (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints_convert import ConversionError, ShapeSource, load_clip, load_t5, plan_part  # noqa: E402
from checkpoints_convert.__main__ import main as convert_cli  # noqa: E402
from checkpoints_convert.kontext import flux_text_encoder  # noqa: E402
from checkpoints_convert.mapping import flatten  # noqa: E402
from checkpoints_convert.published import manifest_shapes  # noqa: E402
from jaxedit.checkpoint import load_params  # noqa: E402
from jaxedit.configs import CLIPTextConfig, T5Config  # noqa: E402
from jaxedit.models import CLIPTextModel, T5Encoder  # noqa: E402
from jaxedit.models import clip as clip_model  # noqa: E402
from jaxedit.models import t5 as t5_model  # noqa: E402
from jaxedit.models.t5 import relative_position_buckets  # noqa: E402
from references.models import clip_text as hf_clip  # noqa: E402
from references.models import save_randomized as saved  # noqa: E402
from references.models import t5_encoder as hf_t5  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

B, L = 3, 37
LENGTHS = (37, 20, 9)  # valid tokens per row; the rest is padding

# Odd sizes: 5 heads of 6, FFN 56, buckets saturating inside the sequence (max_distance 20).
T5_TINY = T5Config(
    vocab_size=97, d_model=40, d_kv=6, d_ff=56, num_layers=3, num_heads=5, relative_attention_max_distance=20
)
CLIP_TINY = CLIPTextConfig(
    vocab_size=101, hidden_size=36, intermediate_size=52, num_layers=3, num_heads=3, max_position_embeddings=41
)


# ---------------------------------------------------------------------------------------
# Full-size manifests (shapes only)


@pytest.mark.parametrize("variant", ["both-embeddings", "shared-only", "embed-tokens-only"])
def test_t5_manifest_maps_every_tensor(variant):
    cfg = presets.get("flux-kontext-dev").t5
    shapes = manifest_shapes("hf-t5-v1_1-xxl-encoder")
    embedding = 32128 * 4096
    if variant == "shared-only":
        del shapes["encoder.embed_tokens.weight"]
    elif variant == "embed-tokens-only":
        del shapes["shared.weight"]
    the_plan = plan_part("t5", ShapeSource(shapes), cfg)
    targets = flatten(t5_model.abstract_params(cfg))
    assert set(the_plan.by_target) == set(targets)
    n_target = sum(int(np.prod(v.shape)) for v in targets.values())
    n_source = sum(int(np.prod(s)) for s in shapes.values())
    # the manifest counts the tied embedding twice; we load it once and check the copy
    checked = embedding if variant == "both-embeddings" else 0
    assert [c.src for c in the_plan.checks] == (["encoder.embed_tokens.weight"] if checked else [])
    assert n_target + checked == n_source
    if variant == "both-embeddings":
        assert n_source == 4_893_906_944  # the manifest's num_params


@pytest.mark.parametrize("prefix,position_ids", [("", False), ("text_model.", True)])
def test_clip_manifest_maps_every_tensor(prefix, position_ids):
    cfg = presets.get("flux-kontext-dev").clip
    shapes = {prefix + k: v for k, v in manifest_shapes("hf-clip-vit-large-patch14-text").items()}
    if position_ids:  # older transformers saved this buffer
        shapes[prefix + "embeddings.position_ids"] = (1, 77)
    the_plan = plan_part("clip", ShapeSource(shapes), cfg)
    targets = flatten(clip_model.abstract_params(cfg))
    assert set(the_plan.by_target) == set(targets)
    n_target = sum(int(np.prod(v.shape)) for v in targets.values())
    assert n_target == 123_060_480  # the manifest's num_params
    assert [c.src for c in the_plan.checks] == (["embeddings.position_ids"] if position_ids else [])


def test_unknown_tensor_is_named():
    shapes = manifest_shapes("hf-t5-v1_1-xxl-encoder")
    shapes["decoder.final_layer_norm.weight"] = (4096,)
    cfg = presets.get("flux-kontext-dev").t5
    with pytest.raises(ConversionError, match="decoder.final_layer_norm.weight"):
        plan_part("t5", ShapeSource(shapes), cfg)
    plan_part("t5", ShapeSource(shapes), cfg, ignore=lambda k: k.startswith("decoder."))  # explicit opt-out


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance in [(32, 128), (32, 20), (30, 100)]:
        rel = torch.arange(700)[None, :] - torch.arange(700)[:, None]
        ref = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(700, 700, buckets, distance), ref)


# ---------------------------------------------------------------------------------------
# Parity against transformers


def token_ids(vocab: int, eos: int, pad: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """[B, L] ids: random tokens, an EOS at the end of each row's valid part, then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab - 1, (B, L))
    mask = np.zeros((B, L), np.int64)
    for i, n in enumerate(LENGTHS):
        ids[i, n - 1] = eos
        ids[i, n:] = pad
        mask[i, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory):
    model = hf_t5(T5_TINY)
    path = saved(model, tmp_path_factory.mktemp("t5"), seed=0)
    return model, path


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_t5_float32_parity(t5_files, scan_layers):
    model, path = t5_files
    params = load_t5(path, T5_TINY)
    ids, mask = token_ids(T5_TINY.vocab_size, eos=1, pad=0)
    ours = T5Encoder(T5_TINY, scan_layers=scan_layers)
    for m in (None, mask):  # FLUX: no mask; general use: padding mask
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m))
        out = jax.jit(ours.apply)({"params": params}, jnp.asarray(ids), None if m is None else jnp.asarray(m))
        err = rel_err(out, ref.last_hidden_state.numpy())
        print(f"T5 float32 ({'scan' if scan_layers else 'loop'}, mask={m is not None}): rel err {err:.2e}")
        assert err <= 1e-5


def test_t5_bfloat16_close_to_float32(tmp_path):
    model = hf_t5(T5_TINY)
    path = saved(model, tmp_path / "t5", seed=1, bf16_weights=True)
    ids, _ = token_ids(T5_TINY.vocab_size, eos=1, pad=0)
    with torch.no_grad():
        truth = model(torch.from_numpy(ids)).last_hidden_state.numpy()
        # transformers 5 keeps `wo` in float32 for float16 loads only: in bfloat16 every weight is bfloat16
        hf_bf16 = transformers.T5EncoderModel.from_pretrained(path, dtype=torch.bfloat16, use_safetensors=True).eval()
        ref = hf_bf16(torch.from_numpy(ids)).last_hidden_state.float().numpy()
    params = load_t5(path, T5_TINY, dtype=jnp.bfloat16)
    out = jax.jit(T5Encoder(T5_TINY, dtype=jnp.bfloat16).apply)({"params": params}, jnp.asarray(ids))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    err, err_hf = rel_err(out, truth), rel_err(ref, truth)
    print(f"T5 bfloat16 vs float32 truth: ours {err:.2e}, transformers {err_hf:.2e}")
    assert err <= 1.5 * err_hf + 1e-3


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("eos_token_id", [2, 100], ids=["legacy-eos2-argmax", "eos-first-occurrence"])
def test_clip_float32_parity(tmp_path, scan_layers, eos_token_id):
    cfg = dataclasses.replace(CLIP_TINY, eos_token_id=eos_token_id)
    model = hf_clip(cfg)
    path = saved(model, tmp_path / "clip", seed=2)
    params = load_clip(path, cfg)
    ids, mask = token_ids(cfg.vocab_size, eos=100, pad=100 if eos_token_id == 2 else 1)
    ours = jax.jit(CLIPTextModel(cfg, scan_layers=scan_layers).apply)
    for m in (None, mask):  # FLUX: causal mask only; general use: causal & padding
        with torch.no_grad():
            ref = model(torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m))
        hidden, pooled = ours({"params": params}, jnp.asarray(ids), None if m is None else jnp.asarray(m))
        e_h = rel_err(hidden, ref.last_hidden_state.numpy())
        e_p = rel_err(pooled, ref.pooler_output.numpy())
        what = f"{'scan' if scan_layers else 'loop'}, eos {eos_token_id}, mask={m is not None}"
        print(f"CLIP float32 ({what}): hidden {e_h:.2e}, pooled {e_p:.2e}")
        assert e_h <= 1e-5 and e_p <= 1e-5


# ---------------------------------------------------------------------------------------
# Known extras of real files, handled by name


def _resave(src: Path, dst: Path, edit) -> Path:
    tensors = load_file(str(src / "model.safetensors"))
    dst.mkdir()
    save_file(edit(dict(tensors)), str(dst / "model.safetensors"))
    return dst


def test_t5_tied_embedding_copies(t5_files, tmp_path):
    _, path = t5_files
    base = load_t5(path, T5_TINY)
    shared = "shared.weight"

    both = _resave(path, tmp_path / "both", lambda t: {**t, "encoder.embed_tokens.weight": t[shared].copy()})
    only = _resave(path, tmp_path / "only", lambda t: {"encoder.embed_tokens.weight": t.pop(shared), **t})
    for p in (both, only):
        got = load_t5(p, T5_TINY)
        for k, v in flatten(base).items():
            np.testing.assert_array_equal(flatten(got)[k], v)

    def differ(t):
        e = t[shared].copy()
        e[5, 3] += 1.0
        return {**t, "encoder.embed_tokens.weight": e}

    with pytest.raises(ConversionError, match="encoder.embed_tokens.weight differs from shared.weight"):
        load_t5(_resave(path, tmp_path / "differ", differ), T5_TINY)


def test_clip_prefix_and_position_ids(tmp_path):
    model = hf_clip(CLIP_TINY)
    path = saved(model, tmp_path / "clip", seed=4)
    base = load_clip(path, CLIP_TINY)
    n = CLIP_TINY.max_position_embeddings

    def old_layout(ids):
        return lambda t: {"text_model." + k: v for k, v in {**t, "embeddings.position_ids": ids}.items()}

    got = load_clip(_resave(path, tmp_path / "old", old_layout(np.arange(n)[None])), CLIP_TINY)
    for k, v in flatten(base).items():
        np.testing.assert_array_equal(flatten(got)[k], v)
    with pytest.raises(ConversionError, match="embeddings.position_ids does not hold the expected values"):
        load_clip(_resave(path, tmp_path / "bad", old_layout(np.arange(n)[None] % 7)), CLIP_TINY)


# ---------------------------------------------------------------------------------------
# FluxTextEncoder end to end (tokenizers trained here, FLUX repo folder layout)

from jaxedit import presets  # noqa: E402
from jaxedit.tokenizers_offline import SENTENCES, train_tokenizers  # noqa: E402

PROMPTS = [
    "make the cat wear a blue hat",
    "Add snow!",
    " ".join(SENTENCES * 2),  # longer than both max lengths: truncated
]


def test_flux_text_encoder_matches_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    preset = presets.get("flux-kontext-tiny")
    root = tmp_path / "flux"
    train_tokenizers(root)
    t5_ref, clip_ref = hf_t5(preset.t5), hf_clip(preset.clip)
    saved(t5_ref, root / "text_encoder_2", seed=5)
    saved(clip_ref, root / "text_encoder", seed=6)

    enc = flux_text_encoder(root, preset, dtype=jnp.float32)
    txt, y = enc.encode(PROMPTS)
    assert txt.shape == (3, preset.t5.max_length, preset.t5.d_model) and y.shape == (3, preset.clip.hidden_size)
    assert preset.transformer.context_in_dim == txt.shape[-1] and preset.transformer.vec_in_dim == y.shape[-1]

    # diffusers' own prompt-embedding code, run on a stand-in pipeline holding the reference parts
    fake = types.SimpleNamespace(
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        text_encoder=clip_ref,
        text_encoder_2=t5_ref,
        tokenizer_max_length=77,
    )
    flux = diffusers.FluxPipeline
    with torch.no_grad():
        ref_txt = flux._get_t5_prompt_embeds(
            fake, PROMPTS, max_sequence_length=preset.t5.max_length, device=torch.device("cpu")
        )
        ref_y = flux._get_clip_prompt_embeds(fake, PROMPTS, device=torch.device("cpu"))
    t5_ids, clip_ids = enc.tokenize(PROMPTS)
    for ours, tok, n in ((t5_ids, fake.tokenizer_2, preset.t5.max_length), (clip_ids, fake.tokenizer, 77)):
        ref_ids = tok(PROMPTS, padding="max_length", max_length=n, truncation=True)["input_ids"]
        np.testing.assert_array_equal(ours, np.asarray(ref_ids))
        assert ours.shape == (3, n) and len(set(map(tuple, ours))) == 3
    assert (clip_ids[:, -1] == fake.tokenizer.eos_token_id).all()  # EOS kept at the end of the truncated prompt
    e_txt, e_y = rel_err(txt, ref_txt.numpy()), rel_err(y, ref_y.numpy())
    print(f"FluxTextEncoder vs diffusers FluxPipeline: txt {e_txt:.2e}, y {e_y:.2e}")
    assert e_txt <= 1e-5 and e_y <= 1e-5

    # the library reads both tokenizer folders without importing torch
    code = (
        "import sys; from jaxedit.kontext.text import load_tokenizer; "
        f"load_tokenizer({str(root / 'tokenizer')!r}); load_tokenizer({str(root / 'tokenizer_2')!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)

    # the CLI writes the same trees as an Orbax checkpoint
    for part, src, direct in (("t5", "text_encoder_2", enc.t5_params), ("clip", "text_encoder", enc.clip_params)):
        dst = tmp_path / f"{part}.orbax"
        assert convert_cli([part, str(root / src), str(dst), "--preset", "flux-kontext-tiny"]) == 0
        for k, v in flatten(load_params(dst)).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten(direct)[k]))


def test_offline_tokenizers_are_reproducible(tmp_path):
    """Training the tokenizers three times on the same sentences gives identical files (the BPE
    trainer's word-final characters come in hash order; the ids are made canonical)."""
    from shapes import vocabulary

    for i in range(3):
        train_tokenizers(tmp_path / str(i), vocabulary(), whole_words=True)
    for sub in ("tokenizer", "tokenizer_2"):
        for f in sorted((tmp_path / "0" / sub).iterdir()):
            for i in (1, 2):
                assert (tmp_path / str(i) / sub / f.name).read_bytes() == f.read_bytes(), f"{sub}/{f.name} differs"
    vocab = json.loads((tmp_path / "0" / "tokenizer" / "vocab.json").read_text())
    assert len(set(vocab.values())) == len(vocab) and sorted(vocab.values()) == list(range(len(vocab)))
