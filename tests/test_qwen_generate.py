"""Qwen2.5-VL generation in JAX (`jaxedit.models.qwen2_5_vl_generate`) against transformers' `generate`: the tiny
random Qwen2.5-VL of tests/tiny_qwen.py converted with our converter, prompts with images of different sizes
through the chat template, left-padded in one batch."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxedit.models import qwen2_5_vl_generate as G
from tests.helpers import max_rel_err as rel_err
from tests.tiny_qwen import load_tiny_qwen

torch = pytest.importorskip("torch")

N = 8  # new tokens
PROMPTS = ["a red circle", "make the square in the picture blue and move it to the left"]
SIZES = [(84, 84), (56, 112)]


@pytest.fixture(scope="module")
def setup(tiny_qwen):
    import transformers

    path, _ = tiny_qwen
    ref, cfg, params, processor = load_tiny_qwen(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    items = G.chat_items(tok, processor, PROMPTS, imgs)
    return ref, cfg, params, tok, items, processor, imgs


def reference(ref, cfg, items, max_new=N, eos=None, pad=0):
    """transformers' greedy generate on the items as one left-padded batch: (ids [B, <= max_new], logits)."""
    length = max(len(x["input_ids"]) for x in items)
    ids = np.zeros((len(items), length), np.int64)
    mask = np.zeros((len(items), length), np.int64)
    for i, x in enumerate(items):
        ids[i, length - len(x["input_ids"]) :], mask[i, length - len(x["input_ids"]) :] = x["input_ids"], 1
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(np.concatenate([x["pixel_values"] for x in items])),
            image_grid_thw=torch.from_numpy(np.concatenate([x["image_grid_thw"] for x in items])),
            mm_token_type_ids=torch.from_numpy(ids == cfg.image_token_id).int(),
            do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[:, length:].numpy(), np.stack([s.numpy() for s in out.logits], 1)


def test_greedy_equals_transformers(setup):
    """Greedy ids equal transformers' exactly (each row alone, and the batch left-padded by transformers);
    the logits of every step agree to float32 precision."""
    ref, cfg, params, _, items, *_ = setup
    assert len(items[0]["input_ids"]) != len(items[1]["input_ids"])
    ours = G.generate(params, cfg, items, N, return_logits=True)
    assert ours.tokens.shape == (2, N) and list(ours.lengths) == [N, N]
    batched_ids, batched_logits = reference(ref, cfg, items)
    for i in range(2):
        want_ids, want_logits = reference(ref, cfg, items[i : i + 1])
        err = rel_err(ours.logits[i], want_logits[0])
        top2 = np.sort(want_logits[0], -1)[:, -2:]
        margin = float((top2[:, 1] - top2[:, 0]).min() / np.abs(want_logits[0]).max())
        print(f"row {i} ({len(items[i]['input_ids'])} prompt tokens): ids {ours.tokens[i].tolist()}, logits rel err "
              f"{err:.2e} (alone), {rel_err(ours.logits[i], batched_logits[i]):.2e} (transformers batched); "
              f"smallest top-2 margin {margin:.1e}")  # fmt: skip
        np.testing.assert_array_equal(ours.tokens[i], want_ids[0])
        np.testing.assert_array_equal(ours.tokens[i], batched_ids[i])
        assert err <= 1e-5 and rel_err(ours.logits[i], batched_logits[i]) <= 1e-5


def test_stop_tokens_and_padding(setup):
    """A stop token ends a row (kept, counted in its length), the row is padded after it, the other row goes on;
    transformers with that id as eos gives the same ids."""
    ref, cfg, params, _, items, *_ = setup
    free = G.generate(params, cfg, items, N)
    row = free.tokens[0]
    k = next(k for k in range(1, N - 1) if row[k] not in row[:k] and row[k] not in free.tokens[1])
    stop = int(row[k])
    pad = int(cfg.text.vocab_size - 1)
    ours = G.generate(params, cfg, items, N, stop_ids=[stop], pad_id=pad)
    assert list(ours.lengths) == [k + 1, N]
    assert ours.tokens[0, : k + 1].tolist() == row[: k + 1].tolist() and set(ours.tokens[0, k + 1 :]) == {pad}
    want, _ = reference(ref, cfg, items, eos=stop, pad=pad)
    np.testing.assert_array_equal(ours.tokens[:, : want.shape[1]], want)
    # every row stops: the loop ends early, the rest is padding
    both = G.generate(params, cfg, items, N, stop_ids=[int(free.tokens[0, 0]), int(free.tokens[1, 0])], pad_id=pad)
    assert list(both.lengths) == [1, 1] and (both.tokens[:, 1:] == pad).all()


def test_sampling_seeded_and_limits(setup):
    """Sampling is reproducible from its seed and changes with it; top_p -> 0 and temperature -> 0 give the
    greedy ids; top_p keeps the smallest nucleus."""
    _, cfg, params, _, items, *_ = setup
    greedy = G.generate(params, cfg, items, N).tokens
    a = G.generate(params, cfg, items, N, temperature=1.5, seed=1).tokens
    b = G.generate(params, cfg, items, N, temperature=1.5, seed=1).tokens
    c = G.generate(params, cfg, items, N, temperature=1.5, seed=2).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, greedy)
    np.testing.assert_array_equal(G.generate(params, cfg, items, N, temperature=1.5, top_p=1e-6, seed=3).tokens, greedy)
    np.testing.assert_array_equal(G.generate(params, cfg, items, N, temperature=1e-6, seed=4).tokens, greedy)
    logits = jnp.log(jnp.asarray([[0.5, 0.1, 0.3, 0.1], [0.05, 0.05, 0.05, 0.85]]))
    kept = np.isfinite(np.asarray(G.top_p_filter(logits, 0.7)))
    assert kept.tolist() == [[True, False, True, False], [False, False, False, True]]


def test_two_device_data_mesh(setup):
    """On a 2-device data mesh (weights sharded by the logical rules, rows and cache split): the same ids and
    logits as on one device."""
    from jaxedit.parallel import sharding as sh

    _, cfg, params, _, items, *_ = setup
    mesh = sh.make_mesh(sh.MeshConfig.parse("data=2"), jax.devices()[:2])
    want = G.generate(params, cfg, items, N, return_logits=True)
    got = G.generate(params, cfg, items, N, return_logits=True, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.logits, want.logits) <= 1e-5


def test_tensor_mesh_splits_the_cache_by_key_value_head(setup):
    """On a 2-device tensor mesh the cache's key/value heads are split with the query heads: the tiny model with
    its one key/value head doubled (k_proj / v_proj columns repeated: the same function with 2 key/value heads,
    so 2 divides them) gives the one-device ids and logits of the original."""
    import dataclasses

    from jaxedit.models.qwen2_5_vl import kv_cache_names
    from jaxedit.parallel import sharding as sh

    _, cfg, params, _, items, *_ = setup
    hd = cfg.text.head_dim

    def doubled(kind):
        t = dict(params["language_model"]["layers"][kind])
        for name, x in t.items():
            x = np.asarray(x)
            t[name] = np.repeat(x.reshape(*x.shape[:-1], -1, hd), 2, axis=-2).reshape(*x.shape[:-1], -1)
        return t

    layers = params["language_model"]["layers"] | {k: doubled(k) for k in ("k_proj", "v_proj")}
    params2 = params | {"language_model": params["language_model"] | {"layers": layers}}
    cfg2 = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_kv_heads=2 * cfg.text.num_kv_heads))
    mesh = sh.make_mesh(sh.MeshConfig.parse("tensor=2"), jax.devices()[:2])
    with sh.activate(mesh):
        assert kv_cache_names(cfg2.text.num_kv_heads)[3] == "act_heads"
        assert kv_cache_names(cfg.text.num_kv_heads)[3] is None  # 1 head: kept whole
    want = G.generate(params, cfg, items, N, return_logits=True)
    got = G.generate(params2, cfg2, items, N, return_logits=True, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.logits, want.logits) <= 1e-5


def test_text_only_row_beside_an_image_row(setup):
    """A prompt without an image batched with one with an image (positions 0, 1, ... over its unmasked tokens, no
    rope delta): each row's greedy ids equal transformers' on it alone."""
    ref, cfg, params, tok, items, *_ = setup
    text = G.chat_items(tok, None, ["a blue square on the left"], [None])[0]
    ours = G.generate(params, cfg, [text, items[0]], N, return_logits=True)
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.from_numpy(text["input_ids"])[None], do_sample=False, max_new_tokens=N,
            eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    np.testing.assert_array_equal(ours.tokens[0], out.sequences[0, len(text["input_ids"]) :].numpy())
    assert rel_err(ours.logits[0], np.stack([s[0].numpy() for s in out.logits])) <= 1e-5
    np.testing.assert_array_equal(ours.tokens[1], reference(ref, cfg, items[:1])[0][0])


def test_plan_generate_lowers_on_cpu_devices():
    """`jaxedit plan --task generate`: the decoding program of a preset's Qwen2.5-VL compiles on a simulated
    8-device mesh (data x fsdp), its cache counted in the report."""
    from jaxedit import plan
    from jaxedit.configs import MeshConfig

    args = plan.parser().parse_args(["--preset", "step1x-edit-tiny", "--task", "generate", "--resolution", "56",
                                     "--text-tokens", "8", "--new-tokens", "4"])  # fmt: skip
    report = plan.plan(args, MeshConfig.parse("data=2,fsdp=4"))
    assert report["new_tokens"] == 4 and report["prompt_tokens"] == 64 and report["kv_cache_bytes"] > 0
    assert "key/value cache" in plan.format_report(report)


def test_generate_chat_decodes_the_answers(setup):
    """Prompts and images in, answers out: the chat template and processor as `chat_items`, stopping at the end of
    turn, special tokens dropped; the same texts as transformers' greedy ids decoded."""
    ref, cfg, params, tok, items, processor, imgs = setup
    texts = G.generate_chat(params, cfg, tok, processor, PROMPTS, imgs, N)
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    want, _ = reference(ref, cfg, items, eos=stops, pad=tok.pad_token_id or 0)
    assert texts == tok.batch_decode(want, skip_special_tokens=True)
    assert all(isinstance(t, str) for t in texts)


def test_judge_presets_have_the_published_sizes():
    """`presets.JUDGES`: Qwen2.5-VL-7B has exactly the parameters of its published checkpoint's manifest; 72B the
    73.4B its model card states (to 0.1%); an editing preset's Qwen2.5-VL is found by the same name lookup, and
    a preset without one fails naming the ones that have one."""
    from pathlib import Path

    from jaxedit import presets
    from jaxedit.models.qwen2_5_vl import abstract_params

    def count(cfg):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))

    root = Path(__file__).resolve().parents[1] / "checkpoints_convert" / "manifests"
    manifest = json.loads((root / "hf-qwen2.5-vl-7b.json").read_text())["tensors"]
    assert count(presets.qwen_vl("qwen2.5-vl-7b")) == sum(int(np.prod(s)) for s in manifest.values())
    assert abs(count(presets.qwen_vl("qwen2.5-vl-72b")) / 73.4e9 - 1) < 1e-3
    assert presets.qwen_vl("step1x-edit") == presets.get("step1x-edit").qwen
    with pytest.raises(KeyError, match="qwen2.5-vl-72b"):
        presets.qwen_vl("flux-kontext-dev")


def test_plan_refuses_a_judge_for_an_editing_task(capsys):
    """A judge preset plans `generate` only: another task fails in one line naming the preset."""
    from jaxedit import plan

    assert plan.main(["--preset", "qwen2.5-vl-72b", "--task", "sample"]) == 2
    assert "qwen2.5-vl-72b" in capsys.readouterr().err


def test_two_images_in_one_prompt(setup):
    """GEdit's SC prompt form: two images of different sizes, then the text, in one user turn (`chat_items` with a
    list of images; the text first with text_first, ImgEdit's form), batched beside a one-image prompt: each
    image's pads (between its vision start and end tokens, in order) match its grid, and the greedy ids equal
    transformers' generate on the same inputs, the logits to float32 precision."""
    ref, cfg, params, tok, items, processor, imgs = setup
    two = G.chat_items(tok, processor, ["is the second picture the first one edited?"], [imgs])[0]
    first = G.chat_items(tok, processor, ["compare"], [list(imgs)], text_first=True)[0]
    for item in (two, first):
        ids = list(item["input_ids"])
        starts = [i for i, t in enumerate(ids) if t == cfg.vision_start_token_id]
        pads = [ids[s + 1 : ids.index(cfg.vision_end_token_id, s)].count(cfg.image_token_id) for s in starts]
        assert pads == [int(np.prod(g)) // 4 for g in item["image_grid_thw"]] and len(pads) == 2
    assert tok.decode(first["input_ids"][: starts[0]]).endswith("compare")  # the text before the images
    ours = G.generate(params, cfg, [two, items[1], first], N, return_logits=True)
    for i, item in enumerate([two, items[1], first]):
        want_ids, want_logits = reference(ref, cfg, [item])
        np.testing.assert_array_equal(ours.tokens[i], want_ids[0])
        assert rel_err(ours.logits[i], want_logits[0]) <= 1e-5


def test_bfloat16_decoding_is_as_close_as_transformers_own(setup):
    """bf16 weights, compute and cache: the first generated step's logits (prefill of image and prompt) against
    transformers' float32 ones are about as close as transformers' own bf16 run (within 2x its error), and the
    decoding runs to the end."""
    ref, cfg, params, _, items, *_ = setup
    want_ids, want = reference(ref, cfg, items[:1])
    p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    ours = G.generate(p16, cfg, items[:1], N, return_logits=True, dtype="bfloat16")
    theirs = reference(ref.to(torch.bfloat16), cfg, items[:1])[1]
    ref.to(torch.float32)
    e_ours, e_theirs = rel_err(ours.logits[0, 0], want[0, 0]), rel_err(theirs[0, 0].astype(np.float32), want[0, 0])
    assert 0 < e_ours <= 2 * e_theirs, (e_ours, e_theirs)
    assert ours.tokens.shape == (1, N) and int(ours.lengths[0]) == N


def test_prefill_through_splash_keeps_padding_finite(setup):
    """The prefill attends with the no-cache path's kernel (here splash, in the Pallas interpreter): left-padded
    rows of different lengths and an empty row (every slot padding, so its queries see only padding) give the
    default path's ids and logits, and the prefilled cache holds no NaN or inf."""
    from jaxedit.models.qwen2_5_vl import QwenVL

    _, cfg, params, _, items, *_ = setup
    want = G.generate(params, cfg, items, N, return_logits=True)
    got = G.generate(params, cfg, items, N, return_logits=True, attention_impl="splash_interpret")
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.logits, want.logits) <= 1e-5
    batch = G.batch_inputs(items, cfg, rows=3)  # the third row is all padding
    model = QwenVL(cfg, attention_impl="splash_interpret", kv_cache=True)
    b, length = batch["ids"].shape
    t = cfg.text
    cache = tuple(jnp.zeros((t.num_layers, b, length + 2, t.num_kv_heads, t.head_dim)) for _ in range(2))
    keys = np.concatenate([batch["mask"], np.ones((b, 2), np.int32)], 1)
    vision = jax.tree.map(jnp.asarray, batch["vision"])
    logits, cache = model.apply({"params": params}, batch["ids"], batch["positions"], keys, cache, 0, vision,
                                batch["feature_index"], method=QwenVL.decode)  # fmt: skip
    assert not batch["mask"][2].any()
    assert all(bool(jnp.isfinite(x).all()) for x in (logits, *cache))
