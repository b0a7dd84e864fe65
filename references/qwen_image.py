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
