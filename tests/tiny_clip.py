"""A tiny random transformers CLIPModel converted into a CLIP folder by our converter (`python -m checkpoints_convert
clip-model`), for the CLIP metrics' parity tests (tests/test_clip_metrics.py) and `jaxedit eval --clip`
(tests/test_eval.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxedit.configs import CLIPTextConfig
from jaxedit.models.clip_vision import CLIPModelConfig, CLIPVisionConfig

# odd, unequal sizes: text 36 wide (3 heads of 12), vision 40 wide (5 heads of 8), 30 px images in 6 px patches
TEXT = dict(hidden_size=36, intermediate_size=52, num_layers=3, num_heads=3, max_position_embeddings=23, max_length=23)
VISION = CLIPVisionConfig(hidden_size=40, intermediate_size=60, num_layers=2, num_heads=5, patch_size=6, image_size=30)


def build_tiny_clip(root: Path, seed: int = 7):
    """(transformers CLIPModel, its CLIPImageProcessor, the transformers folder root/hf, our converted folder
    root/jax, the config): a tiny random CLIPModel saved with save_pretrained (safetensors) with an offline-trained
    CLIP tokenizer and an image processor at its size, converted by `checkpoints_convert clip-model`."""
    import transformers

    from checkpoints_convert.__main__ import main as convert_cli
    from jaxedit.tokenizers_offline import train_tokenizers
    from references.clip_model import clip_model as hf_clip_model

    train_tokenizers(root / "tok")
    vocab = len(json.loads((root / "tok" / "tokenizer" / "vocab.json").read_text()))
    cfg = CLIPModelConfig(CLIPTextConfig(vocab_size=vocab + 3, **TEXT), VISION, projection_dim=24)
    model = hf_clip_model(cfg, seed=seed)
    src = root / "hf"
    model.save_pretrained(src)
    for f in (root / "tok" / "tokenizer").iterdir():
        shutil.copy(f, src / f.name)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    proc.save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["vision_config"]["hidden_size"] == 40
    dst = root / "jax"
    assert convert_cli(["clip-model", str(src), str(dst)]) == 0
    return model, proc, src, dst, cfg
