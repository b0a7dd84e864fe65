"""FLUX.1 Kontext [dev] LoRA fine-tune: rank-16 adapters on every attention and MLP projection of
the 19 double and 38 single blocks; the base weights stay frozen. At the end the adapters are
written as <checkpoint_dir>/lora.safetensors in the diffusers/PEFT layout
(`FluxKontextPipeline.load_lora_weights` loads it), and lora_ema.safetensors from the EMA.

    python -m train --config configs/kontext_dev_lora.py --set model=/models/jax/flux-kontext-dev \
        --set data.path=/data/pairs --set checkpoint_dir=/ckpt/kontext_lora

The model folder comes from `python -m checkpoints_convert pipeline ... --preset flux-kontext-dev`.
"""

from jaxedit.train.config import TrainConfig
from jaxedit.train.data import DataConfig
from jaxedit.train.lora import LoraConfig
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        model="models/flux-kontext-dev",
        init="folder",
        data=DataConfig(path="data/pairs", batch_size=16, pixel_budget=1024 * 1024, bucket_step=64, num_threads=8),
        # the sampler's resolution-dependent shift; guidance-distilled model: guidance in its usual range
        objective=ObjectiveConfig(timestep="logit_normal", resolution_shift=True, guidance=(2.5, 4.0)),
        optim=OptimConfig(
            lr=1e-4, warmup_steps=50, schedule="constant", weight_decay=1e-4, clip_norm=1.0, ema_decay=0.999
        ),
        lora=LoraConfig(rank=16, alpha=16.0),
        steps=2000,
        grad_accum=1,
        mesh="auto",  # hybrid FSDP: the state sharded within the smallest group of chips holding it (train_mesh)
        dtype="bfloat16",
        remat="full",
        checkpoint_dir="checkpoints/kontext_dev_lora",
        checkpoint_every=250,
        keep=3,
        log_every=10,
    )
