"""Qwen-Image-Edit end to end against diffusers' `QwenImageEditPlusPipeline` (tiny random DiT and VAE, every
parameter randomised, saved with `save_pretrained` and converted with our converter): the final latents of a
3-step edit with true CFG (norm-rescaled), given the same prompt embeddings, noise and scheduler, for one and two
reference images of other sizes and aspects than the target, for the 2509 (zero_cond_t off) and 2511 (on)
transformers; and our schedule against the scheduler's own sigmas and timesteps.

The pipelines' image areas (about 1024 x 1024 px for the VAE, 384 x 384 for Qwen2.5-VL) are set to small ones in
both, so the tiny models run in seconds; the code paths are the same.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from checkpoints_convert.qwen_image import load_qwen_image_transformer  # noqa: E402
from checkpoints_convert.qwen_image_vae import load_qwen_image_vae  # noqa: E402
from jaxedit import configs  # noqa: E402
from jaxedit.qwen_image import pipeline as ours  # noqa: E402
from jaxedit.qwen_image import sampling as qs  # noqa: E402
from references.qwen_image import qwen_image_transformer  # noqa: E402
from references.qwen_image_vae import qwen_image_vae  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

VAE_AREA, COND_AREA, STEPS, LT, SCALE = 96 * 96, 64 * 64, 3, 9, 4.0
SCHEDULER = qs.SchedulerConfig()  # Qwen-Image's scheduler_config.json
RESULTS: dict = {}  # (references, zero_cond_t) -> diffusers' final latents


def scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER.to_dict())


@pytest.mark.parametrize("steps,seq_len", [(2, 16), (3, 77), (28, 4096), (40, 12000)])
def test_schedule_matches_the_scheduler(steps, seq_len):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    s = scheduler()
    c = SCHEDULER
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    times = qs.schedule(steps, seq_len, SCHEDULER)
    np.testing.assert_array_equal(times[0], s.sigmas.numpy())
    np.testing.assert_array_equal(times[1, :-1], (s.timesteps / 1000).numpy())
    assert times[0, -2] == pytest.approx(c.shift_terminal, abs=1e-6)


def test_one_step_cannot_reach_the_terminal_shift():
    """diffusers' sigmas are NaN for 1 step with shift_terminal (1 - sigma = 0 in the stretch): refused here, and
    fine without it (a few-step LoRA's scheduler)."""
    with pytest.raises(ValueError, match="shift_terminal"):
        qs.schedule(1, 16, SCHEDULER)
    lightning = qs.SchedulerConfig(base_shift=np.log(3), max_shift=np.log(3), shift_terminal=None)
    s = diffusers.FlowMatchEulerDiscreteScheduler(**lightning.to_dict())
    s.set_timesteps(sigmas=np.linspace(1.0, 1.0, 1), mu=np.log(3))
    np.testing.assert_array_equal(qs.schedule(1, 16, lightning)[0], s.sigmas.numpy())


@pytest.mark.parametrize("name", ["qwen-image-edit-2509", "qwen-image-edit-2511"])
def test_published_checkpoints_map_completely(name):
    """The published DiT (1,933 tensors, 20.4B values), VAE and Qwen2.5-VL-7B (manifests: names and shapes) map
    onto the preset's parameters, every parameter filled once (the converter's plan; nothing is read)."""
    from checkpoints_convert import ShapeSource, part_config, plan_part
    from checkpoints_convert.published import candidates, manifest_shapes
    from jaxedit import presets

    preset = presets.get(name)
    found = {p.part: p.name for part in ("transformer", "vae", "qwen") for p in candidates(part, preset=name)}
    assert set(found) == {"transformer", "vae", "qwen"}
    for part, manifest in found.items():
        the_plan = plan_part(part, ShapeSource(manifest_shapes(manifest), manifest), part_config(preset, part))
        assert the_plan.fmt in ("diffusers", "transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny diffusers DiT (2509 and 2511 share the weights) and VAE, saved and converted."""
    tmp = tmp_path_factory.mktemp("qwen_image_pipe")
    cfg = configs.QwenImageConfig(num_layers=2, attention_head_dim=16, num_attention_heads=3,
                                  joint_attention_dim=40, axes_dims_rope=(4, 6, 6))  # fmt: skip
    vae_cfg = configs.QwenImageVAEConfig(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    dit, vae = qwen_image_transformer(cfg, seed=3), qwen_image_vae(vae_cfg, seed=4)
    dit.save_pretrained(tmp / "transformer", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    params = {"transformer": load_qwen_image_transformer(tmp / "transformer", cfg),
              "vae": load_qwen_image_vae(tmp / "vae", vae_cfg)}  # fmt: skip
    return cfg, vae_cfg, dit, vae, params


def set_zero_cond_t(dit, flag: bool) -> None:
    """2509 or 2511 from the same weights: the flag only chooses the reference tokens' timestep."""
    for m in dit.modules():
        if hasattr(m, "zero_cond_t"):
            m.zero_cond_t = flag


def images(n: int):
    rng = np.random.default_rng(7)
    sizes = [(88, 56), (50, 70)][:n]  # aspects other than the target's
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511"])
@pytest.mark.parametrize("n_refs", [1, 2])
def test_edit_matches_diffusers(models, monkeypatch, zero_cond_t, n_refs):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    cfg, vae_cfg, dit, vae, params = models
    cfg = dataclasses.replace(cfg, zero_cond_t=zero_cond_t)
    set_zero_cond_t(dit, zero_cond_t)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", VAE_AREA)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", COND_AREA)
    monkeypatch.setattr(ours, "VAE_AREA", VAE_AREA)
    monkeypatch.setattr(ours, "CONDITION_AREA", COND_AREA)
    width, height = 80, 64
    rng = np.random.default_rng(11)
    emb = rng.standard_normal((1, LT, cfg.joint_attention_dim)).astype(np.float32)
    mask = np.ones((1, LT), np.int64)
    neg = rng.standard_normal((1, LT - 3, cfg.joint_attention_dim)).astype(np.float32)
    neg_mask = np.ones((1, LT - 3), np.int64)
    latents = rng.standard_normal((1, (height // 16) * (width // 16), 64)).astype(np.float32)
    refs = images(n_refs)

    theirs = plus.QwenImageEditPlusPipeline(scheduler(), vae, None, None, None, dit)
    with torch.no_grad():
        want = theirs(
            image=refs, prompt_embeds=torch.from_numpy(emb), prompt_embeds_mask=torch.from_numpy(mask),
            negative_prompt_embeds=torch.from_numpy(neg), negative_prompt_embeds_mask=torch.from_numpy(neg_mask),
            true_cfg_scale=SCALE, num_inference_steps=STEPS, height=height, width=width,
            latents=torch.from_numpy(latents), output_type="latent",
        ).images.numpy()  # fmt: skip

    preset = configs.Preset("tiny", "qwen-image-edit", cfg, vae_cfg)
    pipe = ours.QwenImageEditPipeline(preset, params, None, dtype=jnp.float32, scheduler=SCHEDULER)
    prepared = [pipe.prepare(refs, width, height)]
    got = pipe.generate(prepared, ["-"], [0], guidance=[1.0], steps=STEPS, latents=latents, output="latents",
                        llm=(emb, mask), negative_llm=(neg, neg_mask), true_cfg_scale=SCALE)  # fmt: skip
    err = rel_err(got, want)
    print(f"final latents, {n_refs} reference(s), zero_cond_t={zero_cond_t}: rel err {err:.2e}")
    assert err <= 1e-4
    RESULTS[n_refs, zero_cond_t] = want
    if (n_refs, not zero_cond_t) in RESULTS:  # the two variants differ (the flag reached diffusers' model)
        assert rel_err(RESULTS[n_refs, False], RESULTS[n_refs, True]) > 1e-3


def test_edit_with_a_lightning_lora_matches_diffusers(models, monkeypatch, tmp_path):
    """A LoRA in Qwen-Image-Lightning's layout (lora_down / lora_up / alpha on every Linear) merged by the pipeline
    (`add_lora`) against diffusers' `load_lora_weights` + `fuse_lora`: the final latents of a 2-step edit without
    CFG (the few-step LoRAs' setting)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from tests.test_qwen_image_lora import DOWN_UP, write_non_diffusers

    cfg, vae_cfg, dit, vae, params = models
    set_zero_cond_t(dit, cfg.zero_cond_t)  # (another test may have left it on)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", VAE_AREA)
    monkeypatch.setattr(ours, "VAE_AREA", VAE_AREA)
    linears = {n: tuple(m.weight.shape) for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    path = write_non_diffusers(tmp_path, 5, linears, "lightning", stem=str, down_up=DOWN_UP)
    rng = np.random.default_rng(12)
    emb = rng.standard_normal((1, LT, cfg.joint_attention_dim)).astype(np.float32)
    mask = np.ones((1, LT), np.int64)
    width, height = 64, 48
    latents = rng.standard_normal((1, (height // 16) * (width // 16), 64)).astype(np.float32)
    refs = images(1)

    theirs = plus.QwenImageEditPlusPipeline(scheduler(), vae, None, None, None, dit)
    theirs.load_lora_weights(path, adapter_name="lightning", use_safetensors=True)
    theirs.set_adapters(["lightning"], [0.9])
    theirs.fuse_lora(components=["transformer"], adapter_names=["lightning"])
    try:
        with torch.no_grad():
            want = theirs(image=refs, prompt_embeds=torch.from_numpy(emb), prompt_embeds_mask=torch.from_numpy(mask),
                          true_cfg_scale=1.0, num_inference_steps=2, height=height, width=width,
                          latents=torch.from_numpy(latents), output_type="latent").images.numpy()  # fmt: skip
    finally:
        theirs.unfuse_lora(components=["transformer"])
        theirs.delete_adapters(["lightning"])

    preset = configs.Preset("tiny", "qwen-image-edit", cfg, vae_cfg)
    pipe = ours.QwenImageEditPipeline(preset, params, None, dtype=jnp.float32, scheduler=SCHEDULER)
    pipe.add_lora(path, 0.9)
    pipe.set_true_cfg(1.0, None)
    got = pipe.generate([pipe.prepare(refs, width, height)], ["-"], [0], guidance=[1.0], steps=2, latents=latents,
                        output="latents", llm=(emb, mask))  # fmt: skip
    err = rel_err(got, want)
    print(f"final latents with a Lightning-layout LoRA: rel err {err:.2e}")
    assert err <= 1e-4
    assert pipe.lora_identity()[0]["scale"] == 0.9
