"""Tiny Kontext training run: the `flux-kontext-tiny` model, 64 px pairs, a minute on a CPU.

    python -m train --config configs/kontext_tiny.py --set model=jaxedit/default_model \
        --set data.path=/tmp/pairs --set checkpoint_dir=/tmp/ckpt
"""

from jaxedit.train.config import TrainConfig
from jaxedit.train.data import DataConfig
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="jaxedit/default_model",
        init="folder",
        data=DataConfig(path="data/tiny", batch_size=4, pixel_budget=64 * 64, bucket_step=16, seed=0, num_threads=1),
        objective=ObjectiveConfig(timestep="logit_normal", shift=3.1582, guidance=(1.0, 4.0), prompt_dropout=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", weight_decay=0.01, clip_norm=1.0, ema_decay=0.99),
        steps=12,
        grad_accum=2,
        mesh="fsdp=-1",
        dtype="bfloat16",
        remat="dots",
        checkpoint_dir="checkpoints/kontext_tiny",
        checkpoint_every=3,
        keep=2,
    )
