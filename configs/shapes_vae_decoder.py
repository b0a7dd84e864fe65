"""Stage 1b of the default model: fine-tune the VAE decoder on full 64x64 images, encoder frozen.

    python -m train --config configs/shapes_vae_decoder.py
Stage 1 trains on 32x32 crops (cheap); the decoder then adapts to whole images (GroupNorm
statistics and mid-block attention over the full 16x16 latent). The encoder, hence the latents,
shift/scale and everything trained on them, is unchanged: this can run beside stage 2.
"""

from jaxedit.train.data import DataConfig
from jaxedit.train.vae import VAETrainConfig


def get_config() -> VAETrainConfig:
    return VAETrainConfig(
        model="build/shapes",
        init="folder",
        decoder_only=True,
        data=DataConfig(path="data/shapes/train", pixel_budget=64 * 64, bucket_step=64),
        steps=1000,
        batch_size=8,
        crop=64,
        lr=5e-4,
        warmup_steps=20,
        max_images=4000,
        seed=1,
        checkpoint_dir="checkpoints/shapes_vae_decoder",
        checkpoint_every=250,
    )
