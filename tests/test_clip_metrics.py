"""CLIP for the editing metrics: the vision tower and both projections (`jaxedit.models.clip_vision`), the
CLIPModel converter (`python -m checkpoints_convert clip-model`) on the published CLIP-L's manifest, image
preprocessing against transformers' CLIPImageProcessor, and `jaxedit.evaluation.metrics` (L1, CLIP-I, CLIP-T,
logits) against transformers' CLIPModel on a tiny random model converted by our converter, in float32.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints_convert import ConversionError, shapes_of  # noqa: E402
from checkpoints_convert.__main__ import main as convert_cli  # noqa: E402
from checkpoints_convert.clip_model import manifest_shapes, plan_clip_model  # noqa: E402
from jaxedit import clip_folder  # noqa: E402
from jaxedit.evaluation.metrics import ClipScorer, l1  # noqa: E402
from jaxedit.models import clip_vision  # noqa: E402
from jaxedit.models.clip_vision import CLIP_VIT_L_14, CLIPModel, CLIPModelConfig  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.tiny_clip import build_tiny_clip  # noqa: E402

TEXTS = ["a photo of a cat sitting on a red sofa", "add snow!", "make the dog wear a small blue hat and a scarf " * 3]


def images(seed: int = 0) -> list[np.ndarray]:
    """Three uint8 images of different, non-square sizes (smooth enough to survive resizing)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((41, 57), (64, 35), (30, 30)):
        yy, xx = np.mgrid[:h, :w] / max(h, w)
        base = np.stack([np.sin(6 * yy + c) * np.cos(5 * xx - c) for c in range(3)], -1)
        out.append(np.clip(127 + 100 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


# ---------------------------------------------------------------------------------------
# The published CLIP-L (shapes only)


@pytest.mark.parametrize("position_ids", [False, True], ids=["transformers5", "with-position-ids"])
def test_manifest_maps_every_tensor_once(position_ids):
    shapes = manifest_shapes()
    assert len(shapes) == 590
    if position_ids:  # files saved by older transformers hold the two buffers
        shapes |= {"text_model.embeddings.position_ids": (1, 77), "vision_model.embeddings.position_ids": (1, 257)}
    the_plan = plan_clip_model(shapes, CLIP_VIT_L_14)  # raises on any unknown, unfilled or doubly filled
    targets = shapes_of(clip_vision.abstract_params(CLIP_VIT_L_14))
    assert set(the_plan.by_target) == set(targets)
    assert sorted({r.src for r in the_plan.rules}) == sorted(k for k in shapes if not k.endswith("position_ids"))
    assert len(the_plan.checks) == (2 if position_ids else 0)
    assert sum(int(np.prod(s)) for s in targets.values()) == 427_616_513  # the manifest's num_params


def test_published_config_is_the_preset():
    """CLIP-L's published config.json (the values below, as openai/clip-vit-large-patch14 has them) reads as
    CLIP_VIT_L_14; the manifest was derived at that config."""
    published = {
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                        "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
                        "eos_token_id": 2, "hidden_act": "quick_gelu"},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "image_size": 224, "hidden_act": "quick_gelu"},
    }  # fmt: skip
    assert CLIPModelConfig.from_hf(published) == CLIP_VIT_L_14
    # its preprocessor_config.json (the older CLIPFeatureExtractor form: sizes as ints)
    old = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
           "feature_extractor_type": "CLIPFeatureExtractor", "size": 224,
           "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711]}  # fmt: skip
    assert clip_folder.ImageProcessing.from_hf(old) == clip_folder.ImageProcessing()
    with pytest.raises(ValueError, match="do_center_crop"):
        clip_folder.ImageProcessing.from_hf(old | {"do_center_crop": False})
    with pytest.raises(ValueError, match="model_type"):
        CLIPModelConfig.from_hf({"model_type": "siglip"})


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s | {"vision_model.extra.weight": (3,)}, "vision_model.extra.weight"),
        (lambda s: {k: v for k, v in s.items() if k != "visual_projection.weight"}, "visual_projection.weight"),
        (lambda s: s | {"vision_model.embeddings.class_embedding": (1023,)}, "class_embedding"),
    ],
    ids=["unknown", "missing", "mis-shaped"],
)
def test_bad_keys_are_named(edit, match):
    with pytest.raises(ConversionError, match=match):
        plan_clip_model(edit(manifest_shapes()), CLIP_VIT_L_14)


# ---------------------------------------------------------------------------------------
# Image preprocessing


@pytest.mark.parametrize("size,crop", [(224, (224, 224)), (30, (30, 30)), (33, (29, 31))])
def test_preprocessing_matches_clip_image_processor(size, crop):
    crop_size = {"height": crop[0], "width": crop[1]}
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size=crop_size)
    ours_proc = clip_folder.ImageProcessing.from_hf(json.loads(proc.to_json_string()))
    assert ours_proc.shortest_edge == size and ours_proc.crop == crop and ours_proc.resample == 3
    imgs = images()
    ref = proc(images=[Image.fromarray(i) for i in imgs], return_tensors="np")["pixel_values"]
    ours = clip_folder.preprocess(imgs, ours_proc)
    assert ours.shape == (3, *crop, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Parity of the converted tiny model and the metrics


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers CLIPModel, its processor, its tokenizer, the transformers folder, our converted folder, the
    config): `tests.tiny_clip.build_tiny_clip`."""
    model, proc, src, dst, cfg = build_tiny_clip(tmp_path_factory.mktemp("clip"))
    return model, proc, transformers.AutoTokenizer.from_pretrained(src), src, dst, cfg


def test_folder_and_config(converted):
    _, _, _, _, dst, cfg = converted
    f = clip_folder.read(dst)
    assert f.config == cfg and f.image_processing.crop == (30, 30)
    assert sorted(p.name for p in dst.iterdir()) == ["clip.json", "params", "tokenizer"]


def test_clip_model_float32_parity(converted):
    """Image / text embeddings, logits and CLIP-I / CLIP-T of the converted tiny model agree with transformers."""
    model, proc, tok, _, dst, cfg = converted
    scorer = ClipScorer.load(dst, batch_size=2)  # 3 images: two batches, the last padded
    imgs = images()
    pixels = proc(images=[Image.fromarray(i) for i in imgs], return_tensors="pt")["pixel_values"]
    enc = tok(TEXTS, padding=True, truncation=True, max_length=cfg.text.max_position_embeddings, return_tensors="pt")
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=pixels)
        ref_txt = model.get_text_features(**enc)
        ref_img, ref_txt = (getattr(x, "pooler_output", x).numpy() for x in (ref_img, ref_txt))
        ref_logits = model(pixel_values=pixels, **enc).logits_per_image.numpy()
    img, txt = scorer.image_features(imgs), scorer.text_features(TEXTS)
    assert img.shape == (3, 24) and txt.shape == (3, 24)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    ref_clip_t = np.sum(unit(ref_img) * unit(ref_txt), -1)
    ref_clip_i = np.sum(unit(ref_img) * unit(ref_img[::-1]), -1)
    errs = {
        "image embeddings": rel_err(img, ref_img),
        "text embeddings": rel_err(txt, ref_txt),
        "logits_per_image": rel_err(scorer.logits(imgs, TEXTS), ref_logits),
        "CLIP-T": float(np.max(np.abs(scorer.text_similarity(imgs, TEXTS) - ref_clip_t))),
        "CLIP-I": float(np.max(np.abs(scorer.image_similarity(imgs, imgs[::-1]) - ref_clip_i))),
    }
    print("CLIP float32 vs transformers: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(v <= 1e-5 for v in errs.values()), errs
    np.testing.assert_allclose(scorer.image_similarity(imgs, imgs), 1.0, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_scan_and_loop_agree(converted, scan_layers):
    _, _, _, _, dst, cfg = converted
    scorer = ClipScorer.load(dst)
    pixels = scorer.pixels(images())
    out = CLIPModel(cfg, scan_layers=scan_layers).apply({"params": scorer.params}, pixels, method="image_features")
    np.testing.assert_allclose(out, scorer.image_features(images()), rtol=0, atol=1e-5)


def test_l1():
    a = np.zeros((4, 6, 3), np.uint8)
    b = np.full((4, 6, 3), 51, np.uint8)
    assert l1(a, b) == pytest.approx(0.2) and l1(a, a) == 0.0
    big = np.full((8, 12, 3), 51, np.uint8)  # resized to a's size (a flat image stays flat)
    assert l1(a, big) == pytest.approx(0.2)
    assert l1(Image.fromarray(a), b) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="uint8"):
        l1(a.astype(np.float32), b)


def test_errors_name_the_folder(converted, tmp_path):
    _, _, _, src, dst, _ = converted
    with pytest.raises(FileNotFoundError, match="convert it with"):  # a transformers folder, not converted
        ClipScorer.load(src)
    with pytest.raises(FileNotFoundError, match="no clip.json"):
        ClipScorer.load(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    (bad / "clip.json").write_text('{"format": "jaxedit-model"}')
    with pytest.raises(ValueError, match="clip.json: not a CLIP model description"):
        ClipScorer.load(bad)
    # converter: a folder without preprocessor_config.json, an existing destination
    partial = tmp_path / "partial"
    shutil.copytree(src, partial)
    (partial / "preprocessor_config.json").unlink()
    assert convert_cli(["clip-model", str(partial), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert convert_cli(["clip-model", str(src), str(dst)]) == 2  # exists: --force needed
    jax.block_until_ready(jnp.zeros(()))


def test_position_ids_buffers_are_checked(converted, tmp_path, capsys):
    """Files saved by older transformers hold both towers' position_ids: arange is accepted (and not loaded),
    anything else is named."""
    from safetensors.numpy import load_file, save_file

    _, _, _, src, dst, cfg = converted
    tensors = load_file(str(src / "model.safetensors"))
    n_vision = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1
    ids = {"text_model.embeddings.position_ids": np.arange(cfg.text.max_position_embeddings)[None],
           "vision_model.embeddings.position_ids": np.arange(n_vision)[None]}  # fmt: skip
    for name, bad in (("old", None), ("bad", "vision_model.embeddings.position_ids")):
        folder = tmp_path / name
        shutil.copytree(src, folder)
        extra = {k: (v[:, ::-1].copy() if k == bad else v) for k, v in ids.items()}
        save_file(tensors | extra, str(folder / "model.safetensors"))
        rc = convert_cli(["clip-model", str(folder), str(tmp_path / f"{name}-jax")])
        assert rc == (2 if bad else 0)
    assert f"{tmp_path / 'bad'}" in capsys.readouterr().err  # the file is named, and the tensor
    ours, ref = ClipScorer.load(tmp_path / "old-jax"), ClipScorer.load(dst)
    np.testing.assert_array_equal(ours.image_features(images()), ref.image_features(images()))
