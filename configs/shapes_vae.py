"""Stage 1 of the default model (jaxedit/default_model): the small VAE on synthetic shapes images.

    python -m train --config configs/shapes_vae.py
Trains build/shapes/vae in place and writes its shift/scale factors into build/shapes/jaxedit.json.
The whole recipe (data, folder, both stages, export) is in docs/default_model.md.
"""

from jaxedit.train.data import DataConfig
from jaxedit.train.vae import VAETrainConfig


def get_config() -> VAETrainConfig:
    return VAETrainConfig(
        model="build/shapes",
        data=DataConfig(path="data/shapes/train", pixel_budget=64 * 64, bucket_step=64),
        steps=2500,
        batch_size=16,
        crop=32,
        lr=3e-3,
        warmup_steps=50,
        kl_weight=1e-6,
        max_images=4000,
        stats_images=512,
        checkpoint_dir="checkpoints/shapes_vae",
        checkpoint_every=250,
    )
