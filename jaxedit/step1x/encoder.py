"""Step1X-Edit's frozen encoders of a training run: Qwen2.5-VL of (instruction, source image), cached per item,
and the VAE (`jaxedit.train.encoders`)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxedit import configs
from jaxedit.train.encoders import Encoder


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
        super().__init__(preset, params, vae_sample)
        self.cache_dir, self.empties = cache_dir, empties

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
