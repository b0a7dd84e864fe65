"""diffusers `QwenImageTransformer2DModel` at a jaxedit `QwenImageConfig`'s sizes, every parameter random."""

from __future__ import annotations

from jaxedit.models.qwen_image import QwenImageConfig
from references.random import randomize_


def qwen_image_transformer(cfg: QwenImageConfig, seed: int = 0):
    """The reference DiT with `cfg`'s sizes and flags, randomised (the same draws for any `zero_cond_t`: the
    parameters do not depend on it), in eval mode."""
    import diffusers

    model = diffusers.QwenImageTransformer2DModel(
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        axes_dims_rope=cfg.axes_dims_rope,
        zero_cond_t=cfg.zero_cond_t,
    )
    randomize_(model, seed)
    return model.eval()


def manifest(cfg: QwenImageConfig | None = None) -> dict:
    """Every tensor (name, PyTorch shape) of a `QwenImageTransformer2DModel(cfg)` state dict (default: the
    published Qwen-Image-Edit DiT), built on torch's meta device (no weights allocated), with its config."""
    import diffusers
    import numpy as np
    import torch

    cfg = cfg or QwenImageConfig()
    config = dict(patch_size=cfg.patch_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                  num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim,
                  num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
                  axes_dims_rope=list(cfg.axes_dims_rope))  # fmt: skip
    with torch.device("meta"):
        model = diffusers.QwenImageTransformer2DModel(**config)
    tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {
        "format": "diffusers-qwen-image-transformer",
        "file": "transformer/diffusion_pytorch_model-0000N-of-0000M.safetensors (diffusers layout, with its index)",
        "model": "Qwen-Image-Edit-2509 / -2511 DiT (QwenImageTransformer2DModel; 2511 differs by zero_cond_t only)",
        "note": (
            "Names and shapes of every tensor of the published checkpoint, derived from diffusers' "
            f"QwenImageTransformer2DModel (diffusers {diffusers.__version__}) at the published config below on the "
            "meta device (references/qwen_image.py: `python -m references.qwen_image`), not read from the files. "
            "The config is the class's defaults (60 layers, 24 heads x 128, text width 3584, axes (16, 56, 56)), "
            "the published transformer/config.json's values; zero_cond_t adds no tensor."
        ),
        "config": config,
        "num_tensors": len(tensors),
        "num_params": int(sum(np.prod(s) for s in tensors.values())),
        "tensors": tensors,
    }


if __name__ == "__main__":
    from pathlib import Path

    from references.qwen_image_vae import manifest_text

    path = Path(__file__).parents[1] / "checkpoints_convert/manifests/diffusers-qwen-image-edit-transformer.json"
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(manifest_text(manifest()))
    tmp.replace(path)
    print(path)
