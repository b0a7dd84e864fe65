"""A tiny FLUX.1 Kontext pipeline in diffusers with every parameter random, saved to disk,
matching the `flux-kontext-tiny` preset (shared by the pipeline tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

from jaxedit import configs


def build_diffusers_kontext(root: Path, seed: int = 0):
    """Build, randomise and `save_pretrained` a FluxKontextPipeline at `root`; returns it."""
    import diffusers
    import transformers

    from jaxedit.tokenizers_offline import train_tokenizers
    from tests.test_flux_parity import reference_model as flux_reference
    from tests.test_text_encoders import hf_clip, hf_t5, saved
    from tests.test_vae import reference_model as vae_reference

    preset = configs.get("flux-kontext-tiny")
    train_tokenizers(root / "_tok")
    t5, clip = hf_t5(preset.t5), hf_clip(preset.clip)
    saved(t5, root / "_t5", seed + 1)  # randomises every parameter
    saved(clip, root / "_clip", seed + 2)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = diffusers.FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae_reference(preset.vae, seed + 3),
        text_encoder=clip,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "_tok" / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=transformers.T5Tokenizer.from_pretrained(root / "_tok" / "tokenizer_2"),
        transformer=flux_reference(preset.transformer, seed + 4),
    )
    pipe.save_pretrained(root / "diffusers")
    return pipe
