"""FLUX.1 Kontext's frozen encoders of a training run: T5 + CLIP and the VAE (`jaxedit.train.encoders`)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxedit import configs, model_folder
from jaxedit.train.encoders import Encoder


class KontextEncoder(Encoder):
    """Text encoders + VAE of a model folder on this process's local devices (host-local)."""

    def __init__(self, folder: Path, preset: configs.Preset, params: dict, vae_sample: bool):
        from jaxedit.kontext.text import FluxTextEncoder, load_tokenizer

        super().__init__(preset, params, vae_sample)
        tok = model_folder.TOKENIZERS
        self.text = FluxTextEncoder(
            preset.t5,
            preset.clip,
            params["t5"],
            params["clip"],
            load_tokenizer(folder / tok["t5"]),
            load_tokenizer(folder / tok["clip"]),
        )

    def __call__(self, batch: dict, key: jax.Array) -> dict[str, np.ndarray]:
        """Host batch (images [b, H, W, 3], instructions) -> latents and text embeddings (numpy)."""
        txt, y = self.text.encode(list(batch["instruction"]))
        return self.latents(batch, key) | {"txt": np.asarray(txt, np.float32), "y": np.asarray(y, np.float32)}
