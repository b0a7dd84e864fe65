"""Step1X-Edit full fine-tune: every weight of the DiT and its Qwen2 connector trains (float32
master weights, AdamW moments and EMA sharded FSDP over all devices, as configs/kontext_dev_full.py;
the DiT has FLUX.1 Kontext [dev]'s size). Qwen2.5-VL-7B stays frozen and runs in PyTorch; each
item's output (instruction and ("", image) for prompt dropout) is cached in <checkpoint_dir>/qwen_cache.

    python -m train --config configs/step1x_edit_full.py --set model=/models/jax/step1x-edit \
        --set data.path=/data/pairs --set checkpoint_dir=/ckpt/step1x_full

The model folder comes from `python -m checkpoints_convert pipeline SRC DST --preset step1x-edit
--qwen QWEN_FOLDER` (it records the Qwen2.5-VL folder; `--set qwen=PATH` overrides it).
"""

from jaxedit.train.config import TrainConfig
from jaxedit.train.data import DataConfig
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="models/step1x-edit",
        init="folder",
        data=DataConfig(path="data/pairs", batch_size=64, pixel_budget=1024 * 1024, bucket_step=64, num_threads=8),
        # the sampler's resolution-dependent shift; reference ids = target ids; no guidance embedding;
        # prompt dropout trains the unconditional branch of the pipeline's classifier-free guidance
        objective=ObjectiveConfig(timestep="logit_normal", resolution_shift=True, ref_index=0.0, prompt_dropout=0.1),
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
        checkpoint_dir="checkpoints/step1x_edit_full",
        checkpoint_every=500,
        keep=3,
        log_every=10,
    )
