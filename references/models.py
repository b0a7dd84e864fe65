"""diffusers / transformers reference models at a jaxedit config's sizes, every parameter random."""

from __future__ import annotations

from pathlib import Path

from jaxedit import presets
from jaxedit.configs import AutoEncoderConfig, CLIPTextConfig, FluxConfig, T5Config
from references.random import randomize_


def flux_transformer(cfg: FluxConfig, seed: int = 0):
    """diffusers `FluxTransformer2DModel` with `cfg`'s sizes, randomised, in eval mode."""
    import diffusers

    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim,
    )
    randomize_(model, seed)
    return model.eval()


def autoencoder(cfg: AutoEncoderConfig, seed: int = 0):
    """diffusers `AutoencoderKL` laid out as the FLUX VAE with `cfg`'s sizes, randomised, in eval mode."""
    import diffusers

    model = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        latent_channels=cfg.z_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.ch_mult),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor,
        mid_block_add_attention=True,
    )
    randomize_(model, seed)
    return model.eval()


def t5_encoder(cfg: T5Config):
    """transformers `T5EncoderModel` (gated GELU, no dropout) with `cfg`'s sizes (not yet randomised)."""
    import transformers

    c = transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    return transformers.T5EncoderModel(c)


def clip_text(cfg: CLIPTextConfig):
    """transformers `CLIPTextModel` (quick GELU) with `cfg`'s sizes (not yet randomised)."""
    import transformers

    c = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="quick_gelu",
        eos_token_id=cfg.eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
    )
    return transformers.CLIPTextModel(c)


def save_randomized(model, path: Path, seed: int, bf16_weights: bool = False) -> Path:
    """Randomise `model`, then `save_pretrained` it at `path` (safetensors). bf16_weights: values exactly
    representable in bfloat16, as the published files are."""
    import torch

    randomize_(model, seed)
    if bf16_weights:
        model.to(torch.bfloat16).to(torch.float32)
    model.eval().save_pretrained(path)
    return path


def kontext_pipeline(root: Path, seed: int = 0):
    """A diffusers `FluxKontextPipeline` matching the `flux-kontext-tiny` preset, every parameter random,
    saved with `save_pretrained` at `root/diffusers` (tokenizers trained offline); returns it."""
    import diffusers
    import transformers

    from jaxedit.tokenizers_offline import train_tokenizers

    preset = presets.get("flux-kontext-tiny")
    train_tokenizers(root / "_tok")
    t5, clip = t5_encoder(preset.t5), clip_text(preset.clip)
    save_randomized(t5, root / "_t5", seed + 1)
    save_randomized(clip, root / "_clip", seed + 2)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = diffusers.FluxKontextPipeline(
        scheduler=scheduler,
        vae=autoencoder(preset.vae, seed + 3),
        text_encoder=clip,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "_tok" / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=transformers.T5Tokenizer.from_pretrained(root / "_tok" / "tokenizer_2"),
        transformer=flux_transformer(preset.transformer, seed + 4),
    )
    pipe.save_pretrained(root / "diffusers")
    return pipe
