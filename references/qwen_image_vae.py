"""diffusers `AutoencoderKLQwenImage` at a `QwenImageVAEConfig`: a randomised reference model, and the manifest
of the published checkpoint's tensor names and shapes derived from the class without allocating weights.

    python -m references.qwen_image_vae   # rewrites checkpoints_convert/manifests/diffusers-qwen-image-vae.json
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from jaxedit.models.qwen_image_vae import QwenImageVAEConfig
from references.random import randomize_

MANIFEST = Path(__file__).resolve().parents[1] / "checkpoints_convert" / "manifests" / "diffusers-qwen-image-vae.json"


def diffusers_config(cfg: QwenImageVAEConfig) -> dict:
    """The `AutoencoderKLQwenImage(**config)` arguments of `cfg` (lists, as config.json holds them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def qwen_image_vae(cfg: QwenImageVAEConfig, seed: int = 0):
    """diffusers `AutoencoderKLQwenImage` with `cfg`, every parameter re-drawn at random, in eval mode."""
    import diffusers

    model = diffusers.AutoencoderKLQwenImage(**diffusers_config(cfg))
    randomize_(model, seed)
    return model.eval()


def manifest(cfg: QwenImageVAEConfig | None = None) -> dict:
    """Every tensor (name, PyTorch shape) of an `AutoencoderKLQwenImage(cfg)` state dict, built on torch's meta
    device (no weights allocated), with the config it was derived from."""
    import diffusers
    import torch

    cfg = cfg or QwenImageVAEConfig()
    with torch.device("meta"):
        model = diffusers.AutoencoderKLQwenImage(**diffusers_config(cfg))
    tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {
        "format": "diffusers-qwen-image-vae",
        "file": "vae/diffusion_pytorch_model.safetensors (diffusers layout, AutoencoderKLQwenImage)",
        "model": "Qwen-Image VAE (Qwen-Image, Qwen-Image-Edit, Qwen-Image-Edit-2509)",
        "note": (
            "Names and shapes of every tensor of the published checkpoint, derived from diffusers' "
            f"AutoencoderKLQwenImage (diffusers {diffusers.__version__}) at the published config below on the "
            "meta device (references/qwen_image_vae.py), not read from the file. Shapes are PyTorch's (Conv3d "
            "weight [out, in, kt, kh, kw]; RMS-norm gamma [C, 1, 1, 1], [C, 1, 1] in the attention blocks). "
            "The config is diffusers' AutoencoderKLQwenImage defaults, which public copies of Qwen/Qwen-Image "
            "vae/config.json match field for field; the Hub file itself was not read."
        ),
        "config": diffusers_config(cfg),
        "num_tensors": len(tensors),
        "num_params": int(sum(np.prod(s) for s in tensors.values())),
        "tensors": tensors,
    }


def manifest_text(m: dict) -> str:
    """JSON with one tensor a line (lists of numbers kept on one line, as the other manifests have them)."""
    text = json.dumps(m, indent=1)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda g: "[" + ", ".join(re.split(r",\s*", g[1])) + "]", text) + "\n"


def write_manifest(path: Path = MANIFEST) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(manifest_text(manifest()))
    tmp.replace(path)


if __name__ == "__main__":
    write_manifest()
    print(MANIFEST)
