"""Qwen-Image-Edit's Qwen2.5-VL conditioning (jaxedit.qwen_image.text) against diffusers' `encode_prompt`.

A tiny random transformers Qwen2.5-VL (every parameter random) with a tokenizer trained offline on the pipeline's
system prompt and the release's image processor settings (PIL backend) is saved, converted into a model folder's
qwen/ with our converter (its tokenizer and processor files in qwen_processor/) and loaded with
`load_qwen_image_embedder`. The reference is diffusers' `QwenImageEditPlusPipeline.encode_prompt` (only its text
encoder, tokenizer and processor set) on the condition images its `__call__` makes, each item alone, float32.

diffusers 0.42 does not pass `mm_token_type_ids` to a transformers-5 text encoder, which then silently falls back
to 1-D text positions (diffusers issue #14194, PR #14189); a forward pre-hook passes them here (as that PR does),
so the reference has the 3-D multimodal positions the model was trained with (transformers 4).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_single  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus  # noqa: E402

from jaxedit.qwen_image import text as qt  # noqa: E402
from jaxedit.tokenizers_offline import SENTENCES  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.tiny_qwen import build_tiny_qwen_vl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["make the sky red", "put the cat from picture 2 on the sofa in picture 1 and turn the lamp on"]
# the release's preprocessor_config.json (Qwen/Qwen-Image-Edit-2509 processor/): 4 .. 16384 merged patches
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384


def image(seed=0, w=90, h=60):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [image(0, 400, 300), image(1, 250, 330)]  # resized for Qwen2.5-VL to 448x320 and 320x448 px


class ImageOnlyProcessor(transformers.Qwen2VLProcessor):
    """The Qwen2-VL processor without its video processor (which needs torchvision, not installed here)."""

    def check_argument_for_proper_class(self, name, arg):
        return None


TOKEN_TYPES = {"on": True}


def forward_token_types(module, args, kwargs):
    """What diffusers PR #14189 forwards: the processor's mm_token_type_ids (1 on image pads)."""
    if TOKEN_TYPES["on"]:
        kwargs.setdefault("mm_token_type_ids", (kwargs["input_ids"] == module.config.image_token_id).int())
    return args, kwargs


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(diffusers Plus pipeline with the tiny Qwen2.5-VL, the single-image Edit pipeline, our embedder, its model
    folder)."""
    from checkpoints_convert import load_part
    from jaxedit import configs, presets
    from jaxedit.model_folder import write_description, write_part

    tmp = tmp_path_factory.mktemp("qwen_image_text")
    src = tmp / "text_encoder"  # a release's text_encoder/ + processor/ in one folder
    system = qt.TEMPLATE.split("{}")[0]
    build_tiny_qwen_vl(src, [system, "Picture 1: Picture 2: Picture 3: ", *PROMPTS, *SENTENCES],
                       min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(src)
    drop = len(tok(system)["input_ids"])  # 64 for the real tokenizer
    assert tok(system + "Picture 1: ")["input_ids"][:drop] == tok(system)["input_ids"]
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        src, dtype=torch.float32, use_safetensors=True
    ).eval()
    model.register_forward_pre_hook(forward_token_types, with_kwargs=True)
    processor = ImageOnlyProcessor(
        image_processor=transformers.Qwen2VLImageProcessorPil.from_pretrained(src), tokenizer=tok, video_processor=None
    )
    parts = dict(scheduler=None, vae=None, text_encoder=model, tokenizer=tok, processor=processor, transformer=None)
    plus, single = edit_plus.QwenImageEditPlusPipeline(**parts), edit_single.QwenImageEditPipeline(**parts)
    for pipe in (plus, single):
        pipe.prompt_template_encode_start_idx = drop

    # our model folder: the Qwen2.5-VL converted into qwen/, the tokenizer / processor files in qwen_processor/
    folder = tmp / "model"
    folder.mkdir()
    qwen_cfg = configs.QwenVLConfig.from_hf(model.config.to_dict())
    preset = presets.get("qwen-image-edit-tiny")
    write_description(folder, preset, extra=qt.qwen_entry(None, qt.QwenImageTextConfig(drop_tokens=drop), qwen_cfg))
    write_part(folder, "qwen", load_part("qwen", src, qwen_cfg, dtype=np.float32))
    (folder / qt.QWEN_PROCESSOR).mkdir()
    for f in src.iterdir():
        if f.suffix in (".json", ".txt", ".jinja") and not f.name.startswith(("model", "generation")):
            shutil.copy2(f, folder / qt.QWEN_PROCESSOR / f.name)
    ours = qt.load_qwen_image_embedder(folder, dtype="float32", attention_impl="xla")
    assert ours.config.drop_tokens == drop and ours.config.picture_prefixes
    return plus, single, ours, folder


def diffusers_condition_image(pipe, img):
    """The condition image `QwenImageEditPlusPipeline.__call__` makes of a reference."""
    w, h = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, img.width / img.height)
    return pipe.image_processor.resize(img, h, w)


def reference(pipe, prompt, images):
    """diffusers' (embeddings [L, D], mask [L]) of one item (its mask None when all ones)."""
    with torch.no_grad():
        emb, mask = pipe.encode_prompt(prompt, image=images, device=torch.device("cpu"))
    emb = emb[0].numpy()
    return emb, np.ones(len(emb), np.int32) if mask is None else mask[0].numpy().astype(np.int32)


@pytest.mark.parametrize("w,h", [(400, 300), (250, 330), (4096, 3771), (97, 1000), (384, 384)])
def test_condition_images_match_diffusers(release, w, h):
    plus, single, _, _ = release
    assert qt.calculate_dimensions(384 * 384, w / h) == edit_plus.calculate_dimensions(384 * 384, w / h)
    assert qt.calculate_dimensions(1024 * 1024, w / h) == edit_single.calculate_dimensions(1024 * 1024, w / h)[:2]
    img = image(w % 7, w, h)
    ours = qt.condition_image(img)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(diffusers_condition_image(plus, img)))
    assert qt.SINGLE_IMAGE.condition_area == 1024 * 1024 and not qt.SINGLE_IMAGE.picture_prefixes


def test_inputs_match_the_processor(release):
    """Token ids (image pads expanded per image), pixel values and grids: those diffusers' processor call gives."""
    plus, _, ours, _ = release
    conditions = [diffusers_condition_image(plus, im) for im in IMAGES]
    text = plus.prompt_template_encode.format("".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>"
                                                      for i in range(2)) + PROMPTS[1])  # fmt: skip
    assert ours.config.text(PROMPTS[1], 2) == text
    want = plus.processor(text=[text], images=conditions, padding=True, return_tensors="np")
    got = ours.prepare_inputs(PROMPTS[1], conditions)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"][0])
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
    assert [tuple(g) for g in got["image_grid_thw"]] == [(1, 22, 32), (1, 32, 22)]  # 308x448, 448x308 px


@pytest.mark.parametrize("n", [1, 2])
def test_embeddings_match_diffusers(release, n):
    """One item with one reference, one with two of different sizes: the kept rows <= 1e-5, the same mask."""
    plus, _, ours, _ = release
    want, want_mask = reference(plus, PROMPTS[n - 1], [diffusers_condition_image(plus, im) for im in IMAGES[:n]])
    emb, mask = ours.encode([PROMPTS[n - 1]], [IMAGES[:n]])
    assert emb.shape == (1, len(want), ours.encoder.hidden_size) and emb.dtype == np.float32
    np.testing.assert_array_equal(mask[0], want_mask)
    err = rel_err(emb[0], want)
    print(f"{n} image(s): {len(want)} kept tokens, rel err vs diffusers {err:.1e}")
    assert err <= 1e-5


def test_batch_pads_to_the_longest(release):
    """Two items (prompts of different lengths, one and two references) in one batch: each item's rows equal
    diffusers' of the item alone, zero-padded to the longest with mask 0."""
    plus, _, ours, _ = release
    items = [(PROMPTS[0], IMAGES[:1]), (PROMPTS[1], IMAGES[::-1])]
    emb, mask = ours.encode([p for p, _ in items], [ims for _, ims in items])
    lengths = []
    for i, (prompt, ims) in enumerate(items):
        want, _ = reference(plus, prompt, [diffusers_condition_image(plus, im) for im in ims])
        n = len(want)
        lengths.append(n)
        assert mask[i].tolist() == [1] * n + [0] * (emb.shape[1] - n)
        err = rel_err(emb[i, :n], want)
        print(f"batch item {i}: {n} kept tokens, rel err vs diffusers alone {err:.1e}")
        assert err <= 1e-5 and not emb[i, n:].any()
    assert emb.shape[1] == max(lengths) and lengths[0] != lengths[1]


def test_the_reference_without_token_types_differs(release):
    """Without mm_token_type_ids diffusers' encoder runs 1-D positions: far from the 3-D positions' result."""
    plus, _, ours, _ = release
    conditions = [diffusers_condition_image(plus, IMAGES[0])]
    TOKEN_TYPES["on"] = False
    try:
        plain, _ = reference(plus, PROMPTS[0], conditions)
    finally:
        TOKEN_TYPES["on"] = True
    fixed, _ = reference(plus, PROMPTS[0], conditions)
    assert rel_err(plain, fixed) > 1e-3


def test_single_image_pipeline(release):
    """The first Qwen-Image-Edit's pipeline (`SINGLE_IMAGE`: no "Picture 1: "), on an image resized already."""
    _, single, ours, _ = release
    cfg = dataclasses.replace(qt.SINGLE_IMAGE, drop_tokens=ours.config.drop_tokens)
    other = qt.QwenImageEmbedder(ours.encoder, ours.tokenizer, ours.image_processor, cfg)
    img = image(3, 150, 100)
    want, want_mask = reference(single, PROMPTS[1], img)
    emb, mask = other.encode([PROMPTS[1]], [[img]], resize=False)
    np.testing.assert_array_equal(mask[0], want_mask)
    assert rel_err(emb[0], want) <= 1e-5
    with pytest.raises(ValueError, match="1 to 1 reference"):
        other.encode([PROMPTS[1]], [[img, img]])


def test_truncation_and_cache(release, tmp_path, monkeypatch):
    _, _, ours, _ = release
    full, _ = ours.encode(PROMPTS[:1], [IMAGES[:1]])
    n = full.shape[1]
    short = qt.QwenImageEmbedder(ours.encoder, ours.tokenizer, ours.image_processor,
                                 dataclasses.replace(ours.config, max_sequence_length=n - 5))  # fmt: skip
    emb, mask = short.encode(PROMPTS[:1], [IMAGES[:1]])
    assert emb.shape[1] == n - 5 and mask.all()
    np.testing.assert_array_equal(emb[0], full[0, : n - 5])

    emb, mask = ours.encode(PROMPTS, [IMAGES[:1], IMAGES], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    monkeypatch.setattr(ours, "embed_items", lambda *a: pytest.fail("the cache was not used"))
    emb2, mask2 = ours.encode(PROMPTS, [IMAGES[:1], IMAGES], cache_dir=tmp_path)
    np.testing.assert_array_equal(emb2, emb)
    np.testing.assert_array_equal(mask2, mask)


def test_sharded_embedder_equals_one_device(release):
    """Loaded onto a data=2 x fsdp=2 mesh (weights split by fsdp, straight from the folder; the two items split
    over the batch axes, padded to four rows): the same embeddings and masks as on one device."""
    import jax

    from jaxedit.parallel import sharding as sh

    _, _, ours, folder = release
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    sharded = qt.load_qwen_image_embedder(folder, dtype="float32", attention_impl="xla", mesh=mesh)
    assert sharded.encoder.params["language_model"]["layers"]["q_proj"]["kernel"].sharding.spec[1] == "fsdp"
    items = (PROMPTS, [IMAGES[:1], IMAGES])
    (emb, mask), (want, want_mask) = sharded.encode(*items), ours.encode(*items)
    np.testing.assert_array_equal(mask, want_mask)
    assert rel_err(emb, want) <= 1e-6


def test_loading_refuses_what_it_cannot_use(release, tmp_path):
    from jaxedit import presets
    from jaxedit.model_folder import write_description

    plus, _, _, folder = release
    plus.text_encoder.config.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="transformers folder"):
        qt.load_qwen_image_embedder(tmp_path / "hf")
    (tmp_path / "bare").mkdir()
    write_description(tmp_path / "bare", presets.get("qwen-image-edit-tiny"), extra=qt.qwen_entry(None))
    with pytest.raises(FileNotFoundError, match="no converted Qwen2.5-VL"):
        qt.load_qwen_image_embedder(tmp_path / "bare")
    with pytest.raises(ValueError, match="unknown Qwen-Image text config"):
        qt.QwenImageTextConfig.from_dict({"drop_tokens": 64, "max_length": 3})


def test_library_imports_no_torch():
    code = (
        "import sys, jaxedit.qwen_image.text, jaxedit.qwen_vl; "
        "from jaxedit.qwen_image.text import QwenImageEmbedder; assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
