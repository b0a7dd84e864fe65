"""Qwen-Image-Edit's frozen encoders of a training run: Qwen2.5-VL of (instruction, the item's reference images)
as the pipeline conditions on them ("Picture N:" prompts, references resized for Qwen), cached per item, and the
Qwen-Image VAE's normalised latents of the target and each reference (`jaxedit.train.encoders`)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxedit import configs
from jaxedit.qwen_vl import bucket
from jaxedit.train.encoders import Encoder

TEXT_BUCKET = 64  # Qwen tokens are padded to a multiple of this: one compiled train step per bucket


class QwenImageEncoder(Encoder):
    """Qwen2.5-VL of (instruction, references) + the VAE's `encode_normalized` (the posterior mean: latents the
    transformer takes). Each item's Qwen output is cached in `cache_dir`; with `empties` each item's ("",
    references) too (prompt dropout). The Qwen states are padded to a multiple of TEXT_BUCKET tokens (mask 0).
    mesh: the Qwen weights sharded over it (a single-process mesh; else each process its own)."""

    def __init__(self, folder: Path, preset: configs.Preset, params: dict, *, qwen: str = "",
                 cache_dir: str | Path | None = None, empties: bool = False, mesh=None):  # fmt: skip
        from jaxedit.models.qwen_image_vae import QwenImageVAE
        from jaxedit.qwen_image.text import load_qwen_image_embedder

        self.text = load_qwen_image_embedder(qwen or folder, mesh=mesh)
        vae = QwenImageVAE(preset.vae)
        self.vae_params = params["vae"]
        self.vae = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode_normalized"))
        self.cache_dir, self.empties = cache_dir, empties

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.vae(self.vae_params, images), np.float32)

    def latents(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """target, reference (of source) and reference_i (of source_i) latents [b, h, w, 16]."""
        more = sorted((k for k in batch if k.startswith("source_")), key=lambda k: int(k[7:]))
        out = {"target": self.encode_images(batch["target"]), "reference": self.encode_images(batch["source"])}
        return out | {"reference_" + k[7:]: self.encode_images(batch[k]) for k in more}

    def __call__(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """-> latents, txt [b, L, D_qwen], txt_mask [b, L] (and empty_txt, empty_mask), L a multiple of
        TEXT_BUCKET."""
        from PIL import Image

        keys = ["source", *sorted((k for k in batch if k.startswith("source_")), key=lambda k: int(k[7:]))]
        pixels = [np.clip(np.round((np.asarray(batch[k]) + 1.0) * 127.5), 0, 255).astype(np.uint8) for k in keys]
        items = [[Image.fromarray(p[i]) for p in pixels] for i in range(len(pixels[0]))]
        texts = {"txt": self.text.encode(list(batch["instruction"]), items, cache_dir=self.cache_dir)}
        if self.empties:
            texts["empty_txt"] = self.text.encode([""] * len(items), items, cache_dir=self.cache_dir)
        length = bucket(max(t.shape[1] for t, _ in texts.values()), TEXT_BUCKET)
        out = self.latents(batch, key)
        for name, (txt, mask) in texts.items():
            pad = length - txt.shape[1]
            out[name] = np.pad(txt, ((0, 0), (0, pad), (0, 0)))
            out[name.replace("txt", "mask") if name != "txt" else "txt_mask"] = np.pad(mask, ((0, 0), (0, pad)))
        return out
