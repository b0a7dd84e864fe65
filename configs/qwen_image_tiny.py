"""Tiny Qwen-Image-Edit training run: a `qwen-image-edit-tiny` model folder (converted from a tiny diffusers
release with its tiny Qwen2.5-VL, as tests/test_qwen_image_train.py makes one), 64 px pairs, on a CPU. The DiT
trains (or, with `--set lora={}`, LoRA adapters on its attention and MLP Linears, exported in diffusers' layout);
Qwen2.5-VL sees each item's instruction and reference images, its outputs cached per item.

    python -m train --config configs/qwen_image_tiny.py --set model=/tmp/qwen_image_tiny \\
        --set data.path=/tmp/pairs --set checkpoint_dir=/tmp/ckpt
"""

from jaxedit.train.config import TrainConfig
from jaxedit.train.data import DataConfig
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="models/qwen-image-edit-tiny",
        init="folder",
        data=DataConfig(path="data/tiny", batch_size=4, pixel_budget=64 * 64, bucket_step=16, seed=0, num_threads=1),
        # no guidance embedding; the pipeline's sigma is the objective's t; dropout -> ("", references)
        objective=ObjectiveConfig(timestep="logit_normal", shift=3.0, prompt_dropout=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", weight_decay=0.01, clip_norm=1.0),
        steps=12,
        grad_accum=2,
        mesh="fsdp=-1",
        dtype="bfloat16",
        remat="dots",
        checkpoint_dir="checkpoints/qwen_image_tiny",
        checkpoint_every=3,
        keep=2,
    )
