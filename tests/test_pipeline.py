"""End-to-end parity of KontextPipeline with diffusers' FluxKontextPipeline and FluxPipeline.

A tiny random diffusers pipeline is saved with save_pretrained, converted with
`python -m checkpoints_convert pipeline`, and both run from the same initial latents:
batch 2, a non-square 64x48 image, 4 steps, guidance 3.5, auto-resize off. Several references (of different
sizes): against the reference path of diffusers' community pipeline_flux_kontext_multiple_images (re-implemented
here on the same diffusers components, following its source: the package does not ship examples/).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxedit import presets  # noqa: E402
from jaxedit.kontext.pipeline import KontextPipeline  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

W, H, STEPS, GUIDANCE = 64, 48, 4, 3.5
PROMPTS = ["make the cat wear a blue hat", "add snow to the mountains"]


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in PROMPTS]


@pytest.fixture(scope="module")
def pipes(tiny_kontext):
    ref, dst = tiny_kontext
    ours = KontextPipeline.load(dst, dtype=jnp.float32, auto_resize=False, compile_cache=False)
    latents = np.random.default_rng(1).standard_normal((2, (H // 16) * (W // 16), 64)).astype(np.float32)
    return ref, ours, latents


def to_uint8(x):
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def compare(ref_latents, ref_images, our_latents, our_images, what):
    err = rel_err(our_latents, ref_latents)
    ours_px = np.stack([np.asarray(im) for im in our_images]).astype(int)
    diff = np.abs(ours_px - to_uint8(ref_images).astype(int))
    within = float((diff <= 1).mean())
    print(f"{what}: final latents rel err {err:.2e}; pixels within 1/255: {100 * within:.3f}%, max diff {diff.max()}")
    assert err <= 1e-4
    assert within >= 0.999


def test_kontext_edit_matches_diffusers(pipes):
    ref, ours, latents = pipes
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=64)
    with torch.no_grad():
        common = dict(image=images(), prompt=PROMPTS, latents=torch.from_numpy(latents), _auto_resize=False,
                      max_area=W * H, **kw)  # fmt: skip
        ref_lat = ref(output_type="latent", **common).images.numpy()
        ref_img = ref(output_type="np", **common).images
    args = (images(), PROMPTS, [0, 1])
    our_lat = ours(*args, steps=STEPS, guidance=GUIDANCE, width=W, height=H, latents=latents, output="latents")
    our_img = ours(*args, steps=STEPS, guidance=GUIDANCE, width=W, height=H, latents=latents)
    assert our_img[0].size == (W, H)
    compare(ref_lat, ref_img, our_lat, our_img, "Kontext edit")


def test_kontext_true_cfg_matches_diffusers(pipes):
    """true_cfg_scale > 1 with a negative prompt per item: diffusers runs the negative branch too."""
    ref, ours, latents = pipes
    negative = ["", "a blurry photo"]
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=64)
    with torch.no_grad():
        ref_lat = ref(image=images(), prompt=PROMPTS, negative_prompt=negative, true_cfg_scale=3.0,
                      latents=torch.from_numpy(latents), _auto_resize=False, max_area=W * H, output_type="latent",
                      **kw).images.numpy()  # fmt: skip
    args = (images(), PROMPTS, [0, 1])
    kw = dict(steps=STEPS, guidance=GUIDANCE, width=W, height=H, latents=latents, output="latents")
    our_lat = ours(*args, true_cfg_scale=3.0, negative_prompt=negative, **kw)
    plain = ours(*args, **kw)
    err = rel_err(our_lat, ref_lat)
    print(f"true CFG: final latents rel err {err:.2e}; vs no CFG {rel_err(plain, ref_lat):.2e}")
    assert err <= 1e-4
    assert rel_err(plain, ref_lat) > 100 * err  # the negative branch changed the result
    with pytest.raises(ValueError, match="true_cfg_scale"):
        ours(*args, true_cfg_scale=0.5, **kw)


def community_multi_reference(ref, images, prompts, latents, steps, guidance):
    """Final packed latents of diffusers' examples/community/pipeline_flux_kontext_multiple_images.py
    (`multiple_images=images`: per item a tuple of references; `_auto_resize=False`; the target W x H), its
    `preprocess_images` line by line: the size of the FIRST item's FIRST reference (floored to the VAE factor by
    `get_default_height_width`, then to 16) for every reference (`image_processor.resize` of a list returns it
    as it is; `preprocess` resizes each image, LANCZOS); then each reference VAE-encoded (mode) and packed alone,
    reference i's ids (1, row, col + i * rows); the transformer sees [target | references]; mu from the target's
    tokens; the scheduler's Euler steps."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    b, n = len(prompts), len(images[0])
    multiple_of = ref.vae_scale_factor * 2
    with torch.no_grad():
        txt, pooled, txt_ids = ref.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=64)
        image_height, image_width = ref.image_processor.get_default_height_width(images[0][0])
        image_width = image_width // multiple_of * multiple_of
        image_height = image_height // multiple_of * multiple_of
        refs, ids = [], [ref._prepare_latent_image_ids(b, H // 16, W // 16, "cpu", torch.float32)]
        for i in range(n):
            x = [item[i] for item in images]
            x = ref.image_processor.resize(x, image_height, image_width)
            x = ref.image_processor.preprocess(x, image_height, image_width)
            lat = ref.vae.encode(x).latent_dist.mode()  # FluxKontextPipeline._encode_vae_image (argmax)
            lat = (lat - ref.vae.config.shift_factor) * ref.vae.config.scaling_factor
            lh, lw = lat.shape[2:]
            refs.append(ref._pack_latents(lat, b, lat.shape[1], lh, lw))
            image_ids = ref._prepare_latent_image_ids(b, lh // 2, lw // 2, "cpu", torch.float32)
            image_ids[..., 0] = 1
            image_ids[..., 2] += i * (lh // 2)
            ids.append(image_ids)
        refs, ids = torch.cat(refs, dim=1), torch.cat(ids, dim=0)
        x = torch.from_numpy(latents)
        c = ref.scheduler.config
        mu = calculate_shift(x.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        timesteps, _ = retrieve_timesteps(ref.scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        ref.scheduler.set_begin_index(0)
        g = torch.full([b], guidance, dtype=torch.float32)
        for t in timesteps:
            v = ref.transformer(hidden_states=torch.cat([x, refs], dim=1), timestep=t.expand(b) / 1000, guidance=g,
                                pooled_projections=pooled, encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=ids,
                                return_dict=False)[0][:, : x.shape[1]]  # fmt: skip
            x = ref.scheduler.step(v, t, x, return_dict=False)[0]
    return x.numpy()


REFERENCE_SIZES = [(W, H), (48, 64), (80, 48)]  # (w, h): the first the target's; then portrait, then wider


@pytest.mark.parametrize("n_refs", [2, 3])
def test_multi_reference_edit_matches_the_community_pipeline(pipes, n_refs, caplog):
    """2 and 3 references per item of different sizes (64x48, 48x64, 80x48; batch 2; 2 steps): every reference
    resized to the first's size, final latents within 1e-4 of the community pipeline's; the same references at
    their own sizes ("community-own-sizes") or with other ids change the result, the ids in the same compiled
    program (64x48 references: the community's row offset overlaps columns)."""
    ref, ours, latents = pipes
    rng = np.random.default_rng(10 + n_refs)
    items = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in REFERENCE_SIZES[:n_refs]]
             for _ in PROMPTS]  # fmt: skip
    want = community_multi_reference(ref, items, PROMPTS, latents, 2, GUIDANCE)
    kw = dict(steps=2, guidance=GUIDANCE, width=W, height=H, latents=latents, output="latents")
    first_size = [[im.resize((W, H), Image.Resampling.LANCZOS) for im in item] for item in items]
    with jax.log_compiles(True):
        got = ours(items, PROMPTS, [0, 1], **kw)
        err = rel_err(got, want)
        print(f"{n_refs} references of different sizes: final latents rel err {err:.2e}")
        assert err <= 1e-4
        np.testing.assert_array_equal(ours(first_size, PROMPTS, [0, 1], **kw), got)  # resized as the first
        ours.set_references("index")
        try:
            other = ours(first_size, PROMPTS, [0, 1], **kw)
        finally:
            ours.set_references()
    compiled = [r for r in caplog.records if "compilation of jit(denoise_loop)" in r.getMessage()]
    assert len(compiled) == 1  # one program per bucket, whatever the ids
    assert rel_err(other, want) > 100 * err  # the ids reach the model
    ours.set_references("community-own-sizes")
    try:
        own = ours(items, PROMPTS, [0, 1], **kw)
    finally:
        ours.set_references()
    assert rel_err(own, want) > 100 * err  # each reference at its own size: not the community pipeline's result


def test_text_to_image_matches_diffusers_flux_pipeline(pipes):
    ref, ours, latents = pipes
    t2i = diffusers.FluxPipeline(**{k: v for k, v in ref.components.items() if k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")})  # fmt: skip
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=64)
    with torch.no_grad():
        ref_lat = t2i(prompt=PROMPTS, latents=torch.from_numpy(latents), output_type="latent", **kw).images.numpy()
        ref_img = t2i(prompt=PROMPTS, latents=torch.from_numpy(latents), output_type="np", **kw).images
    our_lat = ours(None, PROMPTS, [0, 1], steps=STEPS, guidance=GUIDANCE, width=W, height=H, latents=latents,
                   output="latents")  # fmt: skip
    our_img = ours(None, PROMPTS, [0, 1], steps=STEPS, guidance=GUIDANCE, width=W, height=H, latents=latents)
    compare(ref_lat, ref_img, our_lat, our_img, "text-to-image")


def test_item_result_independent_of_batch(pipes):
    """Noise comes from each item's seed: an item edited alone equals the same item in a batch."""
    _, ours, _ = pipes
    imgs = images(3)
    both = ours(imgs, PROMPTS, [11, 12], steps=2, guidance=GUIDANCE, output="latents")
    alone = ours(imgs[1:], PROMPTS[1:], [12], steps=2, guidance=GUIDANCE, output="latents")
    np.testing.assert_allclose(both[1], alone[0], rtol=0, atol=1e-5)


def test_persistent_compilation_cache(tmp_path):
    """enable_compilation_cache() makes compiled programs land on disk (reused by a later process)."""
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp; from jaxedit.pipelines.base import enable_compilation_cache; "
        f"enable_compilation_cache({str(tmp_path / 'cache')!r}); "
        "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert any((tmp_path / "cache").iterdir())


def test_bfl_layout_release_converts(tmp_path, tiny_kontext):
    """BFL single files (DiT, ae.safetensors) + the text encoder folders -> model folder; a
    missing part fails before anything is written, naming it."""
    import dataclasses
    import shutil

    from safetensors.numpy import save_file

    from checkpoints_convert import load_transformer, load_vae
    from checkpoints_convert.__main__ import main as convert_cli
    from checkpoints_convert.mapping import flatten
    from checkpoints_convert.pipeline import convert_pipeline
    from jaxedit.checkpoint import load_params
    from tests.test_convert import tiny_bfl_file
    from tests.test_vae import SMALL, random_bfl_state_dict

    # the tiny preset with a VAE of the real BFL structure (full ch_mult, 2 blocks per level)
    preset = dataclasses.replace(presets.get("flux-kontext-tiny"), name="tiny-bfl-vae", vae=SMALL)
    _, converted = tiny_kontext
    src = tmp_path / "bfl"
    src.mkdir()
    dit = tiny_bfl_file(src, preset.transformer).rename(src / "flux1-kontext-tiny.safetensors")
    save_file(random_bfl_state_dict(preset.vae), str(src / "ae.safetensors"))
    diffusers_dir = converted.parent / "diffusers"
    for d in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(diffusers_dir / d, src / d)

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shutil.rmtree(broken / "text_encoder_2")
    assert convert_cli(["pipeline", str(broken), str(tmp_path / "out_broken"), "--preset", "flux-kontext-tiny"]) == 2
    assert not (tmp_path / "out_broken").exists()

    dst = convert_pipeline(src, tmp_path / "out", preset)
    for part, direct in (("transformer", load_transformer(dit, preset.transformer)),
                         ("vae", load_vae(src / "ae.safetensors", preset.vae))):  # fmt: skip
        restored = flatten(load_params(dst / part))
        for k, v in flatten(direct).items():
            np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v))
    pipe = KontextPipeline.load(dst, dtype=jnp.float32, auto_resize=False, compile_cache=False)
    assert pipe(images(), PROMPTS, [0, 1], steps=1)[0].size == (W, H)
