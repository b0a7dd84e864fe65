"""Train the 16-channel VAE of a model folder on the images of an edit-pair dataset.

    python -m train --config configs/shapes_vae.py

Objective: MSE (+ optional L1) reconstruction of random crops (`crop` px; the VAE is convolutional, so a
small crop teaches the same local statistics as the whole image at a fraction of the
cost) + `kl_weight` x KL(posterior || N(0, 1)), decoding the posterior mean (or a sample). At the end
the latent statistics of `stats_images` full images give the folder's `shift_factor`
(mean) and `scale_factor` (1 / std), as BFL defines them, and the folder's `vae/`
checkpoint and `jaxedit.json` are rewritten.

Batches are a function of (seed, step) (image choice and crop offsets), so a run restored
from its last Orbax checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxedit import configs, model_folder
from jaxedit.checkpoint import load_params
from jaxedit.models.autoencoder import AutoEncoder
from jaxedit.parallel import sharding as sh
from jaxedit.train.data import DataConfig, index_manifest, load_image
from jaxedit.train.monitor import truncate_metrics


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    model: str = "build/model"  # model folder whose vae/ is trained (and rewritten at the end)
    data: DataConfig = DataConfig()  # manifest of edit pairs; source and target images are used
    init: str = "random"  # random | folder
    decoder_only: bool = False  # fine-tune the decoder on the frozen encoder's latents (keeps shift/scale)
    steps: int = 1000
    batch_size: int = 16
    crop: int = 32  # training crop side in pixels (a multiple of 8)
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    l1_weight: float = 0.0  # + l1_weight x L1 (L1 alone pulls a small VAE towards the background colour)
    sample_posterior: bool = False  # decode a posterior sample (True) or its mean while training
    max_images: int = 4000  # images drawn from the manifest (first items)
    stats_images: int = 512  # full images whose latents set shift/scale
    seed: int = 0
    checkpoint_dir: str = "checkpoints/vae"
    checkpoint_every: int = 200
    keep: int = 2
    log_every: int = 25


def load_images(cfg: VAETrainConfig) -> np.ndarray:
    """The first max_images images (sources, then targets, item by item) as uint8 [N, H, W, 3]."""
    index = index_manifest(cfg.data)
    paths = [(p, index.buckets[b]) for it in index.items for p, b in [*it.source_list(), (it.target, it.bucket)]]
    out = [np.round((load_image(p, size) + 1.0) * 127.5).astype(np.uint8) for p, size in paths[: cfg.max_images]]
    shapes = {x.shape for x in out}
    if len(shapes) != 1:
        raise ValueError(f"{cfg.data.path}: VAE training needs one image size, found {sorted(shapes)}")
    return np.stack(out)


def batch_at(images: np.ndarray, cfg: VAETrainConfig, step: int) -> np.ndarray:
    """Crops of step `step`: [batch, crop, crop, 3] float32 in [-1, 1] (a function of (seed, step))."""
    rng = np.random.default_rng([cfg.seed, step])
    n, h, w, _ = images.shape
    idx = rng.integers(0, n, cfg.batch_size)
    ys = rng.integers(0, h - cfg.crop + 1, cfg.batch_size)
    xs = rng.integers(0, w - cfg.crop + 1, cfg.batch_size)
    crops = np.stack([images[i, y : y + cfg.crop, x : x + cfg.crop] for i, y, x in zip(idx, ys, xs)])
    return crops.astype(np.float32) / 127.5 - 1.0


def vae_loss(
    model: AutoEncoder, params, x, key, kl_weight: float, sample: bool, l1_weight: float = 0.0, frozen_encoder=False
):
    """MSE (+ l1_weight x L1) reconstruction (+ kl_weight x KL). sample=False decodes the posterior mean, as
    the pipelines encode: a small VAE trained on a posterior sample from the start collapses to
    the background (its noise swamps the few shape pixels before the encoder learns to shrink it)."""
    mean, logvar = model.apply({"params": params}, x, method="moments")
    if frozen_encoder:  # no encoder backward pass at all
        mean, logvar = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(logvar)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape) if sample else mean
    recon = model.apply({"params": params}, z, method="decode")
    mse, l1 = jnp.mean((recon - x) ** 2), jnp.mean(jnp.abs(recon - x))
    kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    return mse + l1_weight * l1 + kl_weight * kl, {"mse": mse, "l1": l1, "kl": kl}


def check_run(cfg: VAETrainConfig) -> configs.Preset:
    """The model folder's preset, after every check made before any work (ValueError / FileNotFoundError)."""
    preset = model_folder.read_description(Path(cfg.model))
    if cfg.crop % preset.vae.downsample:
        raise ValueError(f"crop {cfg.crop} is not a multiple of {preset.vae.downsample}")
    if cfg.init not in ("random", "folder"):
        raise ValueError(f"init {cfg.init!r}: use 'folder' or 'random'")
    if cfg.decoder_only and cfg.init != "folder":
        raise ValueError("decoder_only fine-tunes a trained VAE: set init='folder'")
    return preset


def train_vae(cfg: VAETrainConfig) -> dict[str, Any]:
    folder = Path(cfg.model)
    preset = check_run(cfg)
    # train in raw latent units: decode(z) must see z itself while training
    train_cfg = dataclasses.replace(preset.vae, scale_factor=1.0, shift_factor=0.0)
    model = AutoEncoder(train_cfg)
    images = load_images(cfg)
    if cfg.init == "folder":
        params = load_params(folder / "vae", dtype=jnp.float32)
    else:
        params = jax.jit(model.init)(jax.random.key(cfg.seed), jnp.zeros((1, cfg.crop, cfg.crop, 3)))["params"]
        params = sh.unbox(params)  # plain arrays, as every part of a model folder stores them
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched))
    if cfg.decoder_only:  # the latents (and what was trained on them) stay valid
        trainable = {k: k == "decoder" for k in params}
        tx = optax.multi_transform({True: tx, False: optax.set_to_zero()}, trainable)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    key = jax.random.key(cfg.seed)

    @jax.jit
    def step_fn(state, x):
        k = jax.random.fold_in(key, state["step"])
        (loss, aux), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(
            model, state["params"], x, k, cfg.kl_weight, cfg.sample_posterior, cfg.l1_weight, cfg.decoder_only
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }
        return new, {"loss": loss, **aux}

    ckpt_dir = Path(cfg.checkpoint_dir).absolute()
    manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, save_interval_steps=cfg.checkpoint_every)
    )
    start = 0
    if manager.latest_step() is not None:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
        start = int(state["step"])
        print(f"resumed VAE training from step {start} ({ckpt_dir})", flush=True)
    t0, metrics = time.perf_counter(), {}
    truncate_metrics(ckpt_dir.parent / (ckpt_dir.name + "-metrics.jsonl"), start)
    with (ckpt_dir.parent / (ckpt_dir.name + "-metrics.jsonl")).open("a") as log_file:
        for s in range(start, cfg.steps):
            state, metrics = step_fn(state, batch_at(images, cfg, s))
            done = s + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                m = {k: float(v) for k, v in metrics.items()}
                rate = (done - start) * cfg.batch_size / (time.perf_counter() - t0)
                print(f"vae step {done}/{cfg.steps} mse {m['mse']:.5f} l1 {m['l1']:.4f} {rate:.1f} crops/s", flush=True)
                log_file.write(json.dumps({"step": done, **m}) + "\n")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                manager.save(done, args=ocp.args.StandardSave(state), force=done == cfg.steps)
    manager.wait_until_finished()
    manager.close()

    if cfg.decoder_only:
        shift, scale = preset.vae.shift_factor, preset.vae.scale_factor
    else:
        shift, scale = latent_statistics(model, state["params"], images[: cfg.stats_images])
    write_vae(folder, jax.device_get(state["params"]), shift, scale)
    print(f"wrote {folder / 'vae'} (shift_factor {shift:.4f}, scale_factor {scale:.4f})", flush=True)
    return {k: float(v) for k, v in metrics.items()} | {"shift_factor": shift, "scale_factor": scale}


def latent_statistics(model: AutoEncoder, params, images: np.ndarray, batch: int = 64) -> tuple[float, float]:
    """(mean, 1 / std) of the posterior means of `images` (uint8 [N, H, W, 3])."""
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method="moments")[0])
    zs = [
        np.asarray(enc(params, images[i : i + batch].astype(np.float32) / 127.5 - 1.0))
        for i in range(0, len(images), batch)
    ]
    z = np.concatenate(zs).astype(np.float64)
    return float(z.mean()), float(1.0 / z.std())


def write_vae(folder: Path, params, shift: float, scale: float) -> None:
    """Replace the folder's vae/ checkpoint and its scale/shift factors in jaxedit.json (each written beside,
    then renamed into place)."""
    model_folder.write_part(folder, "vae", params)
    desc = model_folder.read_json(folder)
    desc["config"]["vae"] |= {"shift_factor": shift, "scale_factor": scale}
    model_folder.write_json(folder / "jaxedit.json", desc)
