"""transformers `CLIPModel` at a `CLIPModelConfig`: a randomised reference model, and the manifest of the published
openai/clip-vit-large-patch14 checkpoint's tensor names and shapes derived from the class without allocating weights.

    python -m references.clip_model   # rewrites checkpoints_convert/manifests/hf-clip-vit-large-patch14.json
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxedit.models.clip_vision import CLIP_VIT_L_14, CLIPModelConfig
from references.random import randomize_

MANIFEST = Path(__file__).resolve().parents[1] / "checkpoints_convert" / "manifests" / "hf-clip-vit-large-patch14.json"


def hf_config(cfg: CLIPModelConfig, **text_extra) -> dict:
    """The `transformers.CLIPConfig(**config)` arguments of `cfg` (quick GELU, as CLIP-L's config.json says)."""
    t, v = cfg.text, cfg.vision
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
                hidden_act="quick_gelu", eos_token_id=t.eos_token_id, bos_token_id=0, pad_token_id=1,
                projection_dim=cfg.projection_dim, **text_extra)  # fmt: skip
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
                  num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act="quick_gelu",
                  projection_dim=cfg.projection_dim)  # fmt: skip
    return dict(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def clip_model(cfg: CLIPModelConfig, seed: int = 0, **text_extra):
    """transformers `CLIPModel` with `cfg`'s sizes, every parameter re-drawn at random (logit_scale too), in eval
    mode."""
    import transformers

    model = transformers.CLIPModel(transformers.CLIPConfig(**hf_config(cfg, **text_extra)))
    randomize_(model, seed)
    return model.eval()


def manifest(cfg: CLIPModelConfig = CLIP_VIT_L_14) -> dict:
    """Every tensor (name, PyTorch shape) of a `CLIPModel` state dict at `cfg` (default: the published
    openai/clip-vit-large-patch14), built on torch's meta device, with its config."""
    import torch
    import transformers

    config = hf_config(cfg)
    with torch.device("meta"):
        model = transformers.CLIPModel(transformers.CLIPConfig(**config))
    tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {
        "format": "hf-clip-vit-large-patch14",
        "file": "model.safetensors (transformers CLIPModel; the release's folder also holds config.json, the "
        "tokenizer files and preprocessor_config.json)",
        "model": "CLIP ViT-L/14 (openai/clip-vit-large-patch14): both towers, visual_projection, text_projection, "
        "logit_scale",
        "note": (
            "Names and shapes of every tensor of the published checkpoint, derived from transformers' CLIPModel "
            f"(transformers {transformers.__version__}) at the published config below on the meta device "
            "(references/clip_model.py: `python -m references.clip_model`), not read from the file. Files written "
            "by older transformers may also hold the two embeddings.position_ids buffers (checked, not loaded)."
        ),
        "config": config,
        "num_tensors": len(tensors),
        "num_params": int(sum(np.prod(s) for s in tensors.values())),
        "tensors": tensors,
    }


if __name__ == "__main__":
    from references.qwen_image_vae import manifest_text

    tmp = MANIFEST.with_name(MANIFEST.name + ".new")
    tmp.write_text(manifest_text(manifest()))
    tmp.replace(MANIFEST)
    print(MANIFEST)
