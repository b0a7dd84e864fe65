"""The CLIP vision tower and the two-tower CLIP model in Flax Linen (transformers `CLIPVisionModelWithProjection`,
`CLIPModel`), for the editing metrics' CLIP-I / CLIP-T scores (`jaxedit.evaluation.metrics`).

Parameter names follow transformers' module paths with "/" (`vision_model/embeddings/patch_embedding`,
`vision_model/pre_layrnorm` with transformers' spelling, `visual_projection`), the encoder's `layers.N` stacked
along a leading layer axis (`layers`), as `jaxedit.models.clip` does for the text tower (whose encoder layer this
tower reuses: pre-LN, bidirectional attention here, quick-GELU MLP). The patch embedding, a conv with stride =
kernel and no bias, is a Dense over flattened patches ([C * p * p, D], the torch weight's (C, kh, kw) order).
Images come in as [B, H, W, C] (normalised as CLIPImageProcessor does: `jaxedit.clip_folder.preprocess`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxedit.configs import CLIPTextConfig
from jaxedit.models.clip import CLIPEncoderLayer, CLIPTextModel, LayerNorm, embed_init
from jaxedit.models.flux import stacked
from jaxedit.models.layers import dense
from jaxedit.parallel.sharding import param_init

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers `CLIPVisionConfig` (defaults: ViT-L/14 at 224, openai/clip-vit-large-patch14)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
    """transformers `CLIPConfig`: both towers and the shared embedding width (defaults: openai/clip-vit-large-patch14:
    text 768 wide, 12 layers x 12 heads; vision 1024 wide, 24 layers x 16 heads, patch 14 at 224; projection 768)."""

    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 768

    @classmethod
    def from_hf(cls, config: dict) -> CLIPModelConfig:
        """From a transformers CLIPModel's config.json (a dict); ValueError (one line) for anything else or an
        activation other than quick_gelu."""
        if config.get("model_type") != "clip":
            raise ValueError(f"model_type is {config.get('model_type')!r}, not 'clip' (a transformers CLIPModel)")
        t, v = config.get("text_config") or {}, config.get("vision_config") or {}
        for name, c in (("text_config", t), ("vision_config", v)):
            if c.get("hidden_act", "quick_gelu") != "quick_gelu":
                raise ValueError(f"{name}.hidden_act is {c['hidden_act']!r}; only quick_gelu is implemented")
        d_t, d_v = CLIPTextConfig(), CLIPVisionConfig()
        text = CLIPTextConfig(
            vocab_size=t.get("vocab_size", d_t.vocab_size),
            hidden_size=t.get("hidden_size", 512),  # transformers' CLIPTextConfig defaults (ViT-B/32's)
            intermediate_size=t.get("intermediate_size", 2048),
            num_layers=t.get("num_hidden_layers", 12),
            num_heads=t.get("num_attention_heads", 8),
            max_position_embeddings=t.get("max_position_embeddings", 77),
            layer_norm_eps=t.get("layer_norm_eps", 1e-5),
            eos_token_id=t.get("eos_token_id", 2),
            max_length=t.get("max_position_embeddings", d_t.max_length),
        )
        vision = CLIPVisionConfig(
            hidden_size=v.get("hidden_size", 768),  # transformers' CLIPVisionConfig defaults (ViT-B/32's)
            intermediate_size=v.get("intermediate_size", 3072),
            num_layers=v.get("num_hidden_layers", 12),
            num_heads=v.get("num_attention_heads", 12),
            patch_size=v.get("patch_size", 32),
            image_size=v.get("image_size", 224),
            num_channels=v.get("num_channels", d_v.num_channels),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        )
        return cls(text, vision, config.get("projection_dim", 512))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CLIPModelConfig:
        return cls(CLIPTextConfig(**d["text"]), CLIPVisionConfig(**d["vision"]), int(d["projection_dim"]))


CLIP_VIT_L_14 = CLIPModelConfig()  # openai/clip-vit-large-patch14


class CLIPVisionEmbeddings(nn.Module):
    """[B, H, W, C] -> [B, 1 + N, D]: the class embedding, then the patches' embeddings, plus position embeddings."""

    cfg: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = pixels_BHWC.shape
        p, s = cfg.patch_size, cfg.image_size
        if (h, w, c) != (s, s, cfg.num_channels):
            want = f"[B, {s}, {s}, {cfg.num_channels}]"
            raise ValueError(f"CLIP vision tower takes {want} images, got {pixels_BHWC.shape}")
        g = s // p
        patches = pixels_BHWC[:, : g * p, : g * p].reshape(b, g, p, g, p, c)  # (a conv drops a partial last patch)
        patches = patches.transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, c * p * p)  # (C, kh, kw) as torch flattens
        x = dense(cfg.hidden_size, (None, "embed"), name="patch_embedding", use_bias=False, **kw)(patches)
        cls = self.param("class_embedding", param_init(embed_init, ("embed",)), (cfg.hidden_size,), self.param_dtype)
        pos = nn.Embed(
            g * g + 1,
            cfg.hidden_size,
            embedding_init=param_init(embed_init, (None, "embed")),
            name="position_embedding",
            **kw,
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size)), x], axis=1)
        return x + pos(jnp.arange(g * g + 1))[None]


class CLIPVisionTransformer(nn.Module):
    """`apply({"params": p}, pixels [B, H, W, C])` -> (last_hidden_state [B, 1 + N, D], pooled [B, D]): pooled is
    the class token after `post_layernorm`, as transformers' `pooler_output`."""

    cfg: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, pixels_BHWC: jax.Array):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(cfg, name="embeddings", **kw)(pixels_BHWC.astype(self.dtype))
        x = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        layers = stacked(
            CLIPEncoderLayer,  # (duck-typed on the config's num_heads, intermediate_size, layer_norm_eps)
            cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            name="layers",
            cfg=cfg,
            **kw,
        )
        x, _ = layers(x, None, None)  # no mask: every patch sees every patch
        pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x, pooled


class CLIPModel(nn.Module):
    """Both towers and their projections into the shared embedding space (transformers `CLIPModel`).

    `apply(v, pixels, method="image_features")` -> [B, projection_dim];
    `apply(v, input_ids [B, L], attention_mask [B, L] | None, method="text_features")` -> [B, projection_dim];
    neither normalised (as transformers' `get_image_features` / `get_text_features`). `logit_scale` is the stored
    log of the temperature (logits = exp(logit_scale) * cosine)."""

    cfg: CLIPModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = True

    def setup(self):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextModel(cfg.text, scan_layers=self.scan_layers, **kw)
        self.vision_model = CLIPVisionTransformer(cfg.vision, scan_layers=self.scan_layers, **kw)
        self.visual_projection = dense(cfg.projection_dim, (None, "embed"), name=None, use_bias=False, **kw)
        self.text_projection = dense(cfg.projection_dim, (None, "embed"), name=None, use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype)

    def image_features(self, pixels_BHWC: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels_BHWC)[1])

    def text_features(self, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None) -> jax.Array:
        return self.text_projection(self.text_model(input_ids_BL, attention_mask_BL)[1])

    def __call__(self, pixels_BHWC: jax.Array, input_ids_BL: jax.Array, attention_mask_BL: jax.Array | None = None):
        """(image features [B, P], text features [T, P], logit_scale []) for `init`."""
        return self.image_features(pixels_BHWC), self.text_features(input_ids_BL, attention_mask_BL), self.logit_scale


def abstract_params(cfg: CLIPModelConfig, param_dtype: Dtype = jnp.float32, *, boxed: bool = False):
    """The parameter tree of `CLIPModel(cfg)` as ShapeDtypeStructs (nothing allocated)."""
    model = CLIPModel(cfg, param_dtype=param_dtype)
    s = cfg.vision.image_size
    pixels = jnp.zeros((1, s, s, cfg.vision.num_channels))
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), pixels, jnp.zeros((1, 1), jnp.int32)))["params"]
    return tree if boxed else nn.meta.unbox(tree)
