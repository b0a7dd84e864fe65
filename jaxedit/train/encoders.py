"""The frozen encoders of a training run, on this process's local devices: text encoders and VAE.

An `Encoder` turns a host batch of images and instructions into the arrays the train step takes: the VAE
latents here (`ImageEncoder`), the text conditioning in its model family's subclass (FLUX.1 Kontext's T5 + CLIP
`jaxedit.kontext.encoder.KontextEncoder`, Step1X-Edit's Qwen2.5-VL `jaxedit.step1x.encoder.Step1XEncoder`),
which the family's `train_encoder` makes; `python -m train.precompute` runs them once over a whole dataset.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxedit import configs
from jaxedit.models.autoencoder import AutoEncoder


class ImageEncoder:
    """The VAE's encoder, jitted: images [b, H, W, 3] in [-1, 1] -> latents (posterior mean, or a sample)."""

    def __init__(self, preset: configs.Preset, vae_params, sample: bool = False):
        vae = AutoEncoder(preset.vae)
        self.params, self.sample = vae_params, sample
        self.fn = jax.jit(lambda p, x, k: vae.apply({"params": p}, x, k, method="encode"))

    def __call__(self, images: np.ndarray, key: jax.Array | None = None) -> np.ndarray:
        """Latents [b, h, w, C] (float32 numpy); `key` draws the posterior sample when `sample` is on."""
        return np.asarray(self.fn(self.params, images, key if self.sample else None), np.float32)

    def pair(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """{"reference": latents of batch["source"], "target": latents of batch["target"]}, and
        "reference_i" of each further source "source_i"."""
        ks, kt = jax.random.split(key)
        out = {"reference": self(batch["source"], ks), "target": self(batch["target"], kt)}
        more = (k for k in batch if k.startswith("source_"))
        return out | {"reference_" + k[7:]: self(batch[k], jax.random.fold_in(ks, int(k[7:]))) for k in more}


class Encoder:
    """The frozen encoders of a training run on this process's local devices (host-local): the VAE here, the text
    conditioning (`text`) in a model family's subclass."""

    def __init__(self, preset: configs.Preset, params: dict, vae_sample: bool):
        self.images = ImageEncoder(preset, params["vae"], vae_sample)

    def latents(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """VAE latents of the host batch's source (reference) and target images [b, H, W, 3]."""
        return self.images.pair(batch, key)

    def __call__(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """Host batch (images [b, H, W, 3], instructions) -> the train step's arrays (numpy): latents and the
        family's text conditioning."""
        raise NotImplementedError
