"""FLUX.1 Kontext [dev] full fine-tune: every transformer weight trains (float32 master weights,
AdamW moments and EMA sharded FSDP over all devices; see docs/scaling.md for the memory plan).

    python -m train --config configs/kontext_dev_full.py --set model=/models/jax/flux-kontext-dev \
        --set data.path=/data/pairs --set checkpoint_dir=/ckpt/kontext_full

The model folder comes from `python -m checkpoints_convert pipeline ... --preset flux-kontext-dev`.
"""

from jaxedit.train.config import TrainConfig
from jaxedit.train.data import DataConfig
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="models/flux-kontext-dev",
        init="folder",
        data=DataConfig(path="data/pairs", batch_size=64, pixel_budget=1024 * 1024, bucket_step=64, num_threads=8),
        # the sampler's resolution-dependent shift; guidance-distilled model: guidance in its usual range
        objective=ObjectiveConfig(timestep="logit_normal", resolution_shift=True, guidance=(2.5, 4.0)),
        optim=OptimConfig(
            lr=1e-5,
            warmup_steps=200,
            schedule="cosine",
            final_lr_fraction=0.1,
            weight_decay=0.01,
            clip_norm=1.0,
            ema_decay=0.9999,
        ),
        steps=10000,
        grad_accum=1,
        mesh="auto",  # hybrid FSDP: the state sharded within the smallest group of chips holding it (train_mesh)
        dtype="bfloat16",
        remat="full",
        checkpoint_dir="checkpoints/kontext_dev_full",
        checkpoint_every=500,
        keep=3,
        log_every=10,
    )
