"""FLUX.1 Kontext (family "flux-kontext") and FLUX.1 text-to-image ("flux"): the BFL DiT conditioned on T5
token embeddings and CLIP's pooled vector, any number of reference images, embedded guidance; LoRAs.

Its pipeline and text encoders live in `jaxedit.kontext`; this module says what the shared code asks."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxedit import configs
from jaxedit.families import Family, configure_scheduler, configure_true_cfg, scheduler_flag


def _presets() -> tuple[configs.Preset, ...]:
    c, preset = configs, configs.Preset
    tiny_t5 = c.T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, max_length=64)
    tiny_clip = c.CLIPTextConfig(vocab_size=512, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4)
    full_depth = dataclasses.replace(c.TINY_FLUX, depth=19, depth_single_blocks=38)
    return (
        preset("flux-kontext-dev", "flux-kontext", c.FLUX_DEV, c.FLUX_VAE, c.T5_XXL, c.CLIP_L),
        preset("flux-dev", "flux", c.FLUX_DEV, c.FLUX_VAE, c.T5_XXL, c.CLIP_L),
        # small presets for tests, demos and benchmarks: full structure, tiny widths
        preset("flux-kontext-tiny", "flux-kontext", c.TINY_FLUX, c.TINY_VAE, tiny_t5, tiny_clip),
        preset("flux-kontext-tiny-fulldepth", "flux-kontext", full_depth, c.TINY_VAE, tiny_t5, tiny_clip),
        # The shipped default model (jaxedit/default_model): a small FLUX.1 Kontext-architecture model trained
        # with jaxedit on the synthetic shapes-editing task (shapes, 64x64 images). Text encoders keep their
        # random initialisation (frozen, as FLUX's are); see docs/default_model.md.
        preset(
            "flux-kontext-shapes",
            "flux-kontext",
            c.FluxConfig(
                context_in_dim=64,
                vec_in_dim=64,
                hidden_size=128,
                num_heads=2,  # 2 heads of 64 trained faster (40 vs 47 min) and scored higher than 4 of 32, theta 30
                depth=2,
                depth_single_blocks=4,
                axes_dim=(16, 24, 24),
                theta=10_000,
            ),
            c.AutoEncoderConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8, scale_factor=1.0,
                                shift_factor=0.0),
            c.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, max_length=16),
            c.CLIPTextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             max_length=16, max_position_embeddings=16),
        ),
    )  # fmt: skip


class Kontext(Family):
    title = "FLUX.1 Kontext"
    names = ("flux-kontext", "flux")
    presets = _presets()
    converter = "checkpoints_convert.kontext"
    part_configs = {"transformer": configs.FluxConfig, "vae": configs.AutoEncoderConfig, "t5": configs.T5Config,
                    "clip": configs.CLIPTextConfig}  # fmt: skip
    parts = {
        "transformer": ("flux", "Flux"),
        "vae": ("autoencoder", "AutoEncoder"),
        "t5": ("t5", "T5Encoder"),
        "clip": ("clip", "CLIPTextModel"),
    }
    lora_parts = ("transformer", "clip", "t5")
    max_references = None
    reference_index = 1.0  # reference ids start at 1 (the target's are 0)
    cfg_passes = 1  # guidance is embedded (true CFG is off by default)

    def example_inputs(self, preset: configs.Preset, part: str) -> tuple:
        if part == "transformer":
            from jaxedit.models import flux

            return flux.example_inputs(preset.transformer)
        return super().example_inputs(preset, part)

    # -- LoRA files

    def lora_table(self, preset: configs.Preset, part: str, naming: str) -> list | None:
        """The transformer in BFL or diffusers names (`jaxedit.names.flux`), CLIP and T5 in transformers'."""
        from jaxedit.names import flux, text

        tables = {("transformer", "bfl"): flux.bfl_rules, ("transformer", "diffusers"): flux.diffusers_rules,
                  ("clip", "hf"): text.clip_rules, ("t5", "hf"): text.t5_rules}  # fmt: skip
        table = tables.get((part, naming))
        return None if table is None or getattr(preset, part) is None else table(getattr(preset, part))

    lora_naming = "bfl"  # a trained adapter is a LoRA on a BFL module (one fused matrix)

    def lora_targets(self) -> dict:
        """The double blocks' attention and MLP projections, the single blocks' linear1 / linear2."""
        from jaxedit.train.lora import FLUX_TARGETS

        return dict(FLUX_TARGETS)

    def lora_keys(self) -> Any:
        """What diffusers' `FluxLoraLoaderMixin` reads (`jaxedit.lora.formats.FLUX_KEYS`)."""
        from jaxedit.lora.formats import FLUX_KEYS

        return FLUX_KEYS

    # -- pipeline and command line

    def pipeline(self) -> type:
        from jaxedit.kontext.pipeline import KontextPipeline

        return KontextPipeline

    def footprint(self, preset: configs.Preset, dtype: Any, quantize: str | None, text_on_cpu: bool = False):
        return self.pipeline().footprint(preset, dtype, {"transformer": quantize, "t5": quantize}, text_on_cpu)

    def load_options(self, args: Any, preset: configs.Preset) -> dict:
        from jaxedit.lora import lora_args

        if getattr(args, "scheduler", None) is not None:  # checked before anything loads
            scheduler_flag(configs.FluxSchedulerConfig, args.scheduler)
        kw = {"auto_resize": False} if args.keep_size else {}
        kw |= {"loras": lora_args(args.lora, preset)} if args.lora else {}
        references = {"reference_ids": args.reference_ids, "reference_tokens": args.reference_tokens,
                      "max_image_tokens": args.max_tokens}  # fmt: skip
        kw |= {k: v for k, v in references.items() if v is not None}
        return kw | ({"text_on_cpu": True} if args.text_on_cpu else {})

    def configure(self, pipe: Any, args: Any) -> None:
        """--scheduler over the model folder's schedule (FLUX.1's: shift on/off, base_shift, max_shift); true CFG
        from --true-cfg-scale / --negative-prompt."""
        configure_scheduler(pipe, args)
        configure_true_cfg(pipe, args)

    # -- training

    def conditioning(self) -> Any:
        """T5's `txt` and CLIP's pooled `y`, called with txt_ids, t and guidance (the objective's default)."""
        from jaxedit.train.objective import Conditioning

        return Conditioning()

    def train_args(self, preset: configs.Preset, args: tuple) -> tuple:
        """(txt, txt_ids, t, y, guidance), guidance None for a transformer without guidance embedding."""
        txt, txt_ids, t, y, guidance = args
        return txt, txt_ids, t, y, guidance if preset.transformer.guidance_embed else None

    def train_encoder(self, cfg: Any, folder: Any, preset: configs.Preset, parts: dict, batches: Any, mesh: Any):
        """T5 + CLIP and the VAE on this host (none when data.cache holds latents and text embeddings); the
        empty prompt's (txt, y) for prompt dropout."""
        import jax.numpy as jnp

        dropout = cfg.objective.prompt_dropout > 0
        if batches.cache is not None:  # latents and text embeddings precomputed: no encoder on this host
            return None, tuple(jnp.asarray(a, jnp.float32) for a in batches.cache.empty) if dropout else None
        from jaxedit.kontext.encoder import KontextEncoder

        encoder, empty = KontextEncoder(folder, preset, parts, cfg.vae_sample), None
        if dropout:
            txt, y = encoder.text.encode([""])
            empty = (jnp.asarray(txt[0], jnp.float32), jnp.asarray(y[0], jnp.float32))
        return encoder, empty

    def sample_options(self, cfg: Any, encoder: Any) -> dict:
        """The items' own sizes (floored to multiples of 16) and reference ids, as trained: each source at its
        own size, so "community" samples as "community-own-sizes"."""
        ids = cfg.objective.reference_ids
        return dict(auto_resize=False, reference_ids="community-own-sizes" if ids == "community" else ids)

    def precompute(self, folder: Any, preset: configs.Preset, data: Any, out: Any, batch: int, mesh: str,
                   shard_size: int = 256):  # fmt: skip
        """T5 + CLIP embeddings and VAE latents: a data.cache (of a packed dataset: record shards)."""
        from jaxedit.kontext.precompute import precompute_text

        return precompute_text(folder, preset, data, out, batch, shard_size)

    # -- planner

    def text_tokens(self, preset: configs.Preset) -> int:
        return preset.t5.max_length

    def train_text(self, preset: configs.Preset, batch: int, tokens: int) -> dict[str, tuple[tuple, str]]:
        cfg = preset.transformer
        return {"txt": ((batch, tokens, cfg.context_in_dim), "float32"), "y": ((batch, cfg.vec_in_dim), "float32")}

    def infer_text(self, preset: configs.Preset, batch: int, tokens: int, array) -> tuple:
        """(txt, txt_ids, t, y, guidance or None) of `Flux`."""
        import jax.numpy as jnp

        cfg = preset.transformer
        guidance = array((batch,), jnp.float32) if cfg.guidance_embed else None
        return (array((batch, tokens, cfg.context_in_dim)), array((batch, tokens, 3), jnp.float32),
                array((batch,), jnp.float32), array((batch, cfg.vec_in_dim)), guidance)  # fmt: skip

    def sample_inputs(self, pipe, batch: int, h: int, w: int, steps: int, *, references: int, text_tokens: int,
                      quantize: str | None) -> tuple:  # fmt: skip
        return pipe.sample_inputs(batch, h, w, steps, references=references, text_tokens=text_tokens,
                                  quantize=quantize)  # fmt: skip

    def lower_text(self, preset: configs.Preset, args: Any, mesh: Any, batch: int, array, replicated):
        """T5 + CLIP (bf16; T5's block weights quantised with --quantize) on `args.text_tokens` tokens."""
        import jax
        import jax.numpy as jnp

        from jaxedit import quant
        from jaxedit.parallel import sharding as sh

        if preset.t5 is None or preset.clip is None:
            raise ValueError(f"preset {preset.name} has no T5/CLIP text encoders")
        bf16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        t5, clip = self.module(preset, "t5", **bf16), self.module(preset, "clip", **bf16)
        pt5 = self.abstract_params(preset, "t5", jnp.bfloat16, boxed=True)
        pt5 = sh.abstract_with_shardings(quant.quantize_abstract("t5", pt5, args.quantize), mesh)
        pclip = sh.abstract_with_shardings(self.abstract_params(preset, "clip", jnp.bfloat16, boxed=True), mesh)
        ids_t5 = array((batch, args.text_tokens or self.text_tokens(preset)), jnp.int32)
        ids_clip = array((batch, preset.clip.max_length), jnp.int32)
        with sh.activate(mesh):
            fn = lambda a, b, i, j: (t5.apply({"params": a}, i), clip.apply({"params": b}, j)[1])  # noqa: E731
            return jax.jit(fn).lower(pt5, pclip, ids_t5, ids_clip), {}


FAMILY = Kontext()
