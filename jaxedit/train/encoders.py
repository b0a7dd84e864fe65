"""The frozen encoders of a training run, on this process's local devices: text encoders and VAE.

`Encoder` (FLUX.1 Kontext: T5 + CLIP) and `Step1XEncoder` (Step1X-Edit: Qwen2.5-VL of (instruction,
source image), cached per item) turn a host batch of images and instructions into the arrays the
train step takes; `python -m train.precompute` runs them once over a whole dataset.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxedit import configs, model_folder
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
    """Text encoders + VAE of a model folder on this process's local devices (host-local)."""

    def __init__(self, folder: Path, preset: configs.Preset, params: dict, vae_sample: bool):
        from jaxedit.kontext.text import FluxTextEncoder, load_tokenizer

        tok = model_folder.TOKENIZERS
        self.text = FluxTextEncoder(
            preset.t5,
            preset.clip,
            params["t5"],
            params["clip"],
            load_tokenizer(folder / tok["t5"]),
            load_tokenizer(folder / tok["clip"]),
        )
        self.images = ImageEncoder(preset, params["vae"], vae_sample)

    def latents(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """VAE latents of the host batch's source (reference) and target images [b, H, W, 3]."""
        return self.images.pair(batch, key)

    def __call__(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """Host batch (images [b, H, W, 3], instructions) -> latents and text embeddings (numpy)."""
        txt, y = self.text.encode(list(batch["instruction"]))
        return self.latents(batch, key) | {"txt": np.asarray(txt, np.float32), "y": np.asarray(y, np.float32)}


class Step1XEncoder(Encoder):
    """Step1X-Edit: Qwen2.5-VL of (instruction, source image) + VAE. Each item's Qwen output is cached
    in `cache_dir`; with `empties` each item's ("", source image) too (prompt dropout). mesh: the Qwen
    weights sharded over it and the items split over its batch axes (a single-process mesh: every process
    encodes its own items)."""

    def __init__(
        self,
        folder: Path,
        preset: configs.Preset,
        params: dict,
        vae_sample: bool,
        *,
        qwen: str = "",
        cache_dir: str | Path | None = None,
        empties: bool = False,
        mesh=None,
    ):
        from jaxedit.step1x.text import load_qwen_embedder

        self.text = load_qwen_embedder(folder, qwen or None, mesh=mesh)
        self.cache_dir, self.empties = cache_dir, empties
        self.images = ImageEncoder(preset, params["vae"], vae_sample)

    def __call__(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """-> latents, txt [b, L, D_qwen], txt_mask [b, L] (and empty_txt, empty_mask)."""
        from PIL import Image

        pixels = np.clip(np.round((np.asarray(batch["source"]) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        images = [Image.fromarray(x) for x in pixels]
        txt, mask = self.text.encode(list(batch["instruction"]), images, cache_dir=self.cache_dir)
        out = self.latents(batch, key) | {"txt": txt, "txt_mask": mask}
        if self.empties:
            txt, mask = self.text.encode([""] * len(images), images, cache_dir=self.cache_dir)
            out |= {"empty_txt": txt, "empty_mask": mask}
        return out
