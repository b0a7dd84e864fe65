"""Qwen2.5-VL in JAX against transformers' PyTorch model: a tiny random Qwen2.5-VL (every parameter
drawn at random; 2 vision blocks with one full-attention block and windows of 2x2 merged patches,
2 GQA decoder layers with mrope [1, 3, 3]) converted with our converter."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from checkpoints_convert import ShapeSource, plan_part
from checkpoints_convert.published import manifest_shapes
from jaxedit import configs, presets
from jaxedit.configs import QwenVLConfig
from jaxedit.models import qwen2_5_vl as Q
from tests.helpers import max_rel_err as rel_err
from tests.tiny_qwen import load_tiny_qwen

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    path, _ = tiny_qwen
    return path, *load_tiny_qwen(path)


def images(*sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def jax_vision(cfg, params, pixel_values, grid, **kw):
    v = Q.prepare_vision(np.asarray(pixel_values, np.float32), grid, cfg.vision, pad_to=4)
    arrays = {k: jnp.asarray(x) for k, x in v.items() if k != "inverse"}
    model = Q.QwenVL(cfg, attention_impl="xla", **kw)
    out = jax.jit(lambda p, a: model.apply({"params": p}, a, method=Q.QwenVL.image_features))(params, arrays)
    return np.asarray(out[0])[v["inverse"]]


@pytest.mark.parametrize("sizes", [[(84, 84)], [(84, 84), (56, 112)]], ids=["1-image", "2-images"])
def test_vision_tower_matches_transformers(qwen, sizes):
    """Window attention over transformers' window order (3x3 and 2x4 grids of merged patches: windows of
    2x2 cut at the edges), a full-attention block bounded per image, the 2x2 merger: <= 1e-5."""
    _, ref, cfg, params, processor = qwen
    inputs = processor(images=images(*sizes), return_tensors="np")
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        want = ref.model.visual(torch.from_numpy(inputs["pixel_values"]), grid_thw=torch.from_numpy(grid))
    want = want.pooler_output.numpy()
    got = jax_vision(cfg, params, inputs["pixel_values"], grid)
    err = rel_err(got, want)
    print(f"vision tower, {len(sizes)} image(s), {len(want)} features: float32 rel err {err:.2e}")
    assert got.shape == want.shape and err <= 1e-5


def reference_hidden(ref, ids, **kw):
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True, use_cache=False, **kw)
    return out.hidden_states[-1][0].numpy(), out.logits[0].numpy()


def test_language_model_text_only_batched_and_logits(qwen):
    """Two prompts of different lengths in one padded batch (one with a masked `!` token, id 0, as
    Step1X's ids > 0 mask makes it), GQA with 2 query heads per key head: hidden states and logits of
    every kept token <= 1e-5 against each prompt alone in transformers."""
    _, ref, cfg, params, _ = qwen
    rng = np.random.default_rng(1)
    rows = [rng.integers(1, cfg.text.vocab_size, n) for n in (19, 11)]
    rows[0][5] = 0
    L = 24
    ids = np.zeros((2, L), np.int32)
    mask = np.zeros((2, L), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, r > 0
    pos = np.stack([Q.rope_positions(ids[i], np.ones(L), [], cfg) for i in range(2)], 1)
    model = Q.QwenVL(cfg, attention_impl="xla")
    h, logits = jax.jit(
        lambda p: (model.apply({"params": p}, ids, pos, mask), model.apply({"params": p}, ids, pos, mask, logits=True))
    )(params)
    for i, r in enumerate(rows):
        want_h, want_logits = reference_hidden(
            ref, r.astype(np.int64), attention_mask=torch.from_numpy(r > 0)[None].long()
        )
        keep = r > 0
        err = rel_err(np.asarray(h)[i, : len(r)][keep], want_h[keep])
        err_l = rel_err(np.asarray(logits)[i, : len(r)][keep], want_logits[keep])
        print(f"language model, text only, row {i}: hidden rel err {err:.2e}, logits {err_l:.2e}")
        assert err <= 1e-5 and err_l <= 1e-5


def image_prompt(cfg, n_image, rng, before=7, after=9, high=100):
    text = lambda n: list(rng.integers(1, high, n))  # noqa: E731
    return np.asarray(
        text(before)
        + [cfg.vision_start_token_id]
        + [cfg.image_token_id] * n_image
        + [cfg.vision_end_token_id]
        + text(after)
    )


def test_language_model_with_images_matches_transformers(qwen):
    """Two items, each prompt with its own image (sizes differ), batched: image features scattered into
    the image pads, multimodal rope positions (get_rope_index, a masked token in one row), padding:
    last hidden state of every kept token <= 1e-5 against each item alone in transformers."""
    _, ref, cfg, params, processor = qwen
    rng = np.random.default_rng(2)
    imgs = images((84, 84), (56, 112), seed=3)
    per_item = [processor(images=[im], return_tensors="np") for im in imgs]
    grids = [p["image_grid_thw"] for p in per_item]
    n_img = [int(g.prod()) // cfg.vision.spatial_merge_size**2 for g in grids]
    rows = [image_prompt(cfg, n, rng) for n in n_img]
    rows[1][3] = 0
    L = max(len(r) for r in rows) + 3
    ids, mask, pos = np.zeros((2, L), np.int32), np.zeros((2, L), np.int32), np.zeros((3, 2, L), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, r > 0
        pos[:, i] = Q.rope_positions(ids[i], mask[i], grids[i], cfg)
    pixels = np.concatenate([p["pixel_values"] for p in per_item])
    v = Q.prepare_vision(pixels, np.concatenate(grids), cfg.vision, pad_to=8)
    # image pad k of the batch (row-major) takes merged feature k in the processor's order
    feature_index = np.full((2, L), -1, np.int32)
    feature_index[ids == cfg.image_token_id] = v["inverse"]
    arrays = {k: jnp.asarray(x) for k, x in v.items() if k != "inverse"}
    model = Q.QwenVL(cfg, attention_impl="xla")
    h = jax.jit(lambda p: model.apply({"params": p}, ids, pos, mask, arrays, feature_index))(params)
    for i, r in enumerate(rows):
        want, _ = reference_hidden(
            ref, r.astype(np.int64), attention_mask=torch.from_numpy(r > 0)[None].long(),
            pixel_values=torch.from_numpy(per_item[i]["pixel_values"]),
            image_grid_thw=torch.from_numpy(grids[i]),
            mm_token_type_ids=torch.from_numpy(r == cfg.image_token_id)[None].int(),
        )  # fmt: skip
        keep = r > 0
        err = rel_err(np.asarray(h)[i, : len(r)][keep], want[keep])
        print(f"language model with an image ({n_img[i]} features), row {i}: rel err {err:.2e}")
        assert err <= 1e-5


def test_scan_equals_loop_and_splash_paths(qwen):
    """The stacked layers scanned and unrolled give the same numbers; the TPU kernel (splash, in the Pallas
    interpreter) takes the vision windows and the causal text mask as segment ids: same output."""
    _, _, cfg, params, processor = qwen
    inputs = processor(images=images((84, 84)), return_tensors="np")
    base = jax_vision(cfg, params, inputs["pixel_values"], inputs["image_grid_thw"])
    np.testing.assert_allclose(
        jax_vision(cfg, params, inputs["pixel_values"], inputs["image_grid_thw"], scan_layers=False), base, atol=1e-6
    )
    v = Q.prepare_vision(np.asarray(inputs["pixel_values"]), inputs["image_grid_thw"], cfg.vision, pad_to=4)
    arrays = {k: jnp.asarray(x) for k, x in v.items() if k != "inverse"}
    splash = Q.QwenVL(cfg, attention_impl="splash_interpret")
    got = splash.apply({"params": params}, arrays, method=Q.QwenVL.image_features)
    np.testing.assert_allclose(np.asarray(got[0])[v["inverse"]], base, atol=2e-5)
    ids = np.random.default_rng(4).integers(1, 100, (1, 20)).astype(np.int32)
    pos, mask = np.broadcast_to(np.arange(20), (3, 1, 20)).astype(np.int32), np.ones((1, 20), np.int32)
    outs = [
        Q.QwenVL(cfg, attention_impl=impl, scan_layers=scan).apply({"params": params}, ids, pos, mask)
        for impl, scan in (("xla", True), ("xla", False), ("splash_interpret", True))
    ]
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(outs[2]), np.asarray(outs[0]), atol=2e-5)


def test_published_checkpoint_maps_completely():
    """All 729 tensors of the published Qwen2.5-VL-7B-Instruct (names and shapes, manifest) map onto the
    full-size tree with nothing left over or missing, in both key layouts (transformers 4's `visual.` /
    `model.` names as the released files have them, and transformers 5's); the config reads from both
    config.json layouts."""
    cfg = presets.get("step1x-edit").qwen
    shapes = manifest_shapes("hf-qwen2.5-vl-7b")
    assert len(shapes) == 729
    plan_part("qwen", ShapeSource(shapes), cfg)

    def old(k):
        if k.startswith("model.visual."):
            return k[len("model.") :]
        return "model." + k[len("model.language_model.") :] if k.startswith("model.language_model.") else k

    plan_part("qwen", ShapeSource({old(k): s for k, s in shapes.items()}), cfg)
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(Q.abstract_params(cfg)))
    print(f"Qwen2.5-VL-7B: {n / 1e9:.3f} B parameters")
    v4 = {  # the published config.json (transformers 4.49 layout), trimmed to what is read
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 152064,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "image_token_id": 151655,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31]},
    }  # fmt: skip
    assert QwenVLConfig.from_hf(v4) == cfg
    assert QwenVLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="missing field 'window_size'"):
        QwenVLConfig.from_hf(
            {**v4, "vision_config": {k: x for k, x in v4["vision_config"].items() if k != "window_size"}}
        )


SHARD_CFG = QwenVLConfig(  # widths that 8 devices divide (the converted tiny model's 28 does not)
    configs.QwenVisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, window_size=56,
                             out_hidden_size=32, fullatt_block_indexes=(1,)),
    configs.QwenTextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, mrope_section=(1, 1, 2)),
    image_token_id=63, vision_start_token_id=61, vision_end_token_id=62,
)  # fmt: skip


def test_sharded_equals_unsharded():
    """On 8 fake devices, parameters sharded by the logical rules (FSDP; FSDP x tensor over heads and MLP,
    GQA's key/value heads replicated over tensor) and a batch of 8 prompts with images: the same hidden
    states as on one device, up to the reordered float32 sums of the split contractions (measured: FSDP
    8.6e-7, 1.2e-6 with the tests' XLA flags (conftest.py); FSDP x tensor 1.3e-6, the text and vision parts
    alone 8.6e-7 and 3.0e-7)."""
    from jaxedit.parallel import sharding as sh

    cfg, rng = SHARD_CFG, np.random.default_rng(5)
    grids = np.asarray([[1, 6, 6], [1, 4, 8]] * 4)
    pixels = rng.standard_normal((int(grids.prod(-1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    v = Q.prepare_vision(pixels, grids, cfg.vision, pad_to=8)
    n_img = [int(g.prod()) // 4 for g in grids]
    rows = [image_prompt(cfg, n, rng, 3, 2 + i, high=60) for i, n in enumerate(n_img)]
    L = max(len(r) for r in rows)
    ids, mask, pos = np.zeros((8, L), np.int32), np.zeros((8, L), np.int32), np.zeros((3, 8, L), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
        pos[:, i] = Q.rope_positions(ids[i], mask[i], grids[i : i + 1], cfg)
    feature_index = np.full((8, L), -1, np.int32)
    feature_index[ids == cfg.image_token_id] = v.pop("inverse")
    model = Q.QwenVL(cfg, attention_impl="xla")
    args = (ids, pos, mask, v, feature_index)
    boxed = jax.jit(model.init)(jax.random.key(0), *args)["params"]
    params = nn.meta.unbox(boxed)
    want = jax.jit(model.apply)({"params": params}, *args)
    for mesh_spec in ("fsdp=8", "fsdp=4,tensor=2"):
        mesh = sh.make_mesh(sh.MeshConfig.parse(mesh_spec))
        params_s = jax.device_put(params, sh.shardings(boxed, mesh))
        with sh.activate(mesh):
            got = jax.jit(model.apply)({"params": params_s}, *args)
        print(f"{mesh_spec}: rel err {rel_err(got, want):.2e}")
        assert rel_err(got, want) <= 2e-6
