"""Tiny Step1X-Edit training run: the `step1x-edit-tiny` model with a tiny Qwen2.5-VL, 64 px pairs,
about a minute on a CPU. The DiT and its connector train; the connector gets t in [0, 1].

    python -c "from pathlib import Path; from tests.tiny_qwen import build_tiny_qwen; \
from tests.tiny_step1x import make_tiny_step1x; make_tiny_step1x(Path('/tmp/s1x'), *build_tiny_qwen(Path('/tmp/qwen')))"
    python -m train --config configs/step1x_tiny.py --set model=/tmp/s1x \
        --set data.path=/tmp/pairs --set checkpoint_dir=/tmp/ckpt

(Any Step1X-Edit model folder that records its Qwen2.5-VL folder works; `--set qwen=PATH` overrides it.)
"""

from jaxedit.train.config import TrainConfig
from jaxedit.train.data import DataConfig
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="models/step1x-tiny",
        init="folder",
        data=DataConfig(path="data/tiny", batch_size=4, pixel_budget=64 * 64, bucket_step=16, seed=0, num_threads=1),
        # Step1X-Edit: reference ids = target ids (ref_index 0); no guidance embedding; dropout -> ("", image)
        objective=ObjectiveConfig(timestep="logit_normal", shift=3.1582, ref_index=0.0, prompt_dropout=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", weight_decay=0.01, clip_norm=1.0, ema_decay=0.99),
        steps=12,
        grad_accum=2,
        mesh="fsdp=-1",
        dtype="bfloat16",
        remat="dots",
        checkpoint_dir="checkpoints/step1x_tiny",
        checkpoint_every=3,
        keep=2,
    )
