"""Step1X-Edit (family "step1x-edit"): the FLUX DiT without guidance_in, its text conditioning Qwen2.5-VL
hidden states of (instruction, image) through the Qwen2 connector (inside the transformer checkpoint), one
reference image whose ids equal the target's, classifier-free guidance; no LoRAs.

Its pipeline, sampling loop and Qwen2.5-VL conditioning live in `jaxedit.step1x`; this module says what the
shared code asks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxedit import configs
from jaxedit.families import Family, configure_scheduler, scheduler_flag

# the command line's FLUX-only model options, each refused with its own line
FLUX_ONLY = (
    (("true_cfg_scale", "negative_prompt"), "--true-cfg-scale/--negative-prompt are for FLUX Kontext models; "
     "Step1X-Edit's classifier-free guidance is --guidance"),
    (("text_on_cpu",), "--text-on-cpu is for FLUX Kontext models (Step1X-Edit's Qwen2.5-VL runs where the DiT does)"),
    (("lora",), "--lora: LoRAs are applied to FLUX / FLUX.1 Kontext model folders, not Step1X-Edit"),
    (("reference_ids", "reference_tokens", "max_tokens"),
     "--reference-ids/--reference-tokens/--max-tokens are for FLUX Kontext models"),
)  # fmt: skip


def given(value) -> bool:
    """A command-line option given: not its default (None, False or an empty list)."""
    return value is not None and value is not False and value != []


def loss_call(apply_fn, params, img, img_ids, txt, mask, t, guidance):
    """The loss's model call: `Step1XEdit(img, img_ids, txt, txt_mask, t)`, t in [0, 1] (the connector multiplies
    it by 1000 once; no guidance embedding)."""
    return apply_fn(params, img, img_ids, txt, mask, t)


def conditioning():
    """How the loss feeds Step1X-Edit its text (`jaxedit.train.objective.Conditioning`)."""
    from jaxedit.train.objective import Conditioning

    return Conditioning(keys=("txt", "txt_mask"), call=loss_call)


def _presets() -> tuple[configs.Preset, ...]:
    c = configs
    return (
        # the FLUX DiT without guidance_in, text from Qwen2.5-VL through the connector
        c.Preset("step1x-edit", "step1x-edit", dataclasses.replace(c.FLUX_DEV, guidance_embed=False), c.FLUX_VAE,
                 connector=c.ConnectorConfig(), qwen=c.QwenVLConfig()),
        c.Preset(
            "step1x-edit-tiny",
            "step1x-edit",
            dataclasses.replace(c.TINY_FLUX, guidance_embed=False),
            c.TINY_VAE,
            connector=c.ConnectorConfig(in_channels=28, hidden_size=32, num_heads=4, pooled_dim=24),
            qwen=c.TINY_QWEN_VL,
        ),
    )  # fmt: skip


class Step1X(Family):
    title = "Step1X-Edit"
    names = ("step1x-edit",)
    presets = _presets()
    converter = "checkpoints_convert.step1x"
    part_configs = {"transformer": configs.FluxConfig, "vae": configs.AutoEncoderConfig,
                    "connector": configs.ConnectorConfig}  # fmt: skip
    parts = {"transformer": ("step1x", "Step1XEdit"), "vae": ("autoencoder", "AutoEncoder")}
    lora_parts = ()
    max_references = 1  # Qwen2.5-VL sees the one source image
    reference_index = 0.0  # reference ids equal the target's
    cfg_passes = 2  # CFG on [prompts | negative prompts]
    transformer_configs = ("connector",)  # the Qwen2 connector is part of the transformer

    def module(self, preset: configs.Preset, part: str, **kw: Any):
        if part == "transformer":
            kw["connector_cfg"] = preset.connector
        return super().module(preset, part, **kw)

    def abstract_params(self, preset: configs.Preset, part: str, dtype: Any = None, *, boxed: bool = False) -> Any:
        if part != "transformer":
            return super().abstract_params(preset, part, dtype, boxed=boxed)
        from jaxedit.models import step1x

        kw = {} if dtype is None else {"param_dtype": dtype}
        return step1x.abstract_params(preset.transformer, preset.connector, **kw, boxed=boxed)

    def example_inputs(self, preset: configs.Preset, part: str) -> tuple:
        if part == "transformer":
            from jaxedit.models import step1x

            return step1x.example_inputs(preset.transformer, preset.connector)
        return super().example_inputs(preset, part)

    def description_extra(self, preset: configs.Preset) -> dict | None:
        """The "qwen" entry, no Qwen2.5-VL folder yet (given at load time, or converted in later)."""
        from jaxedit.step1x.text import qwen_entry

        return qwen_entry(None)

    # -- pipeline and command line

    def pipeline(self) -> type:
        from jaxedit.step1x.pipeline import Step1XEditPipeline

        return Step1XEditPipeline

    def footprint(self, preset: configs.Preset, dtype: Any, quantize: str | None, text_on_cpu: bool = False):
        return self.pipeline().footprint(preset, dtype, quantize, preset.qwen)

    def load_options(self, args: Any, preset: configs.Preset) -> dict:
        for flags, message in FLUX_ONLY:
            if any(given(getattr(args, f, None)) for f in flags):
                raise ValueError(message)
        if getattr(args, "scheduler", None) is not None:  # checked before anything loads
            scheduler_flag(configs.FluxSchedulerConfig, args.scheduler)
        kw = {"size_level": None} if args.keep_size else {"size_level": args.size_level} if args.size_level else {}
        return kw | {"qwen": args.qwen}

    def configure(self, pipe: Any, args: Any) -> None:
        """--scheduler over the model folder's schedule (FLUX.1's: shift on/off, base_shift, max_shift)."""
        configure_scheduler(pipe, args)

    # -- training

    def check_train(self, cfg: Any) -> None:
        if cfg.lora is not None:
            raise ValueError("LoRA training exports diffusers' FLUX.1 Kontext layout: train Step1X-Edit fully")
        if cfg.data.cache:
            raise ValueError("data.cache holds T5/CLIP embeddings; Step1X-Edit caches its Qwen outputs in qwen_cache")

    def check_objective(self, objective: Any) -> None:
        if objective.ref_index != 0:
            raise ValueError(
                f"Step1X-Edit's reference ids equal the target's: objective.ref_index=0, not {objective.ref_index}"
            )

    def conditioning(self) -> Any:
        return conditioning()

    def train_batch_keys(self, objective: Any) -> tuple[str, ...]:
        """Qwen's txt and txt_mask; with prompt dropout each item's empty prompt's too (empty_txt, empty_mask:
        Qwen sees the item's image)."""
        dropout = ("empty_txt", "empty_mask") if objective.prompt_dropout > 0 else ()
        return super().train_batch_keys(objective) + dropout

    def train_encoder(self, cfg: Any, folder: Any, preset: configs.Preset, parts: dict, batches: Any, mesh: Any):
        """Qwen2.5-VL of (instruction, source image), each item's output cached in qwen_cache (default
        <checkpoint_dir>/qwen_cache), and the VAE; prompt dropout: each item's ("", image), computed (and cached)
        by the encoder. mesh: the Qwen weights sharded over it on one process (else each process its own)."""
        import jax

        from jaxedit.step1x.encoder import Step1XEncoder

        cache = cfg.qwen_cache or Path(cfg.checkpoint_dir).absolute() / "qwen_cache"
        encoder = Step1XEncoder(
            folder, preset, parts, cfg.vae_sample, qwen=cfg.qwen, cache_dir=cache,
            empties=cfg.objective.prompt_dropout > 0, mesh=mesh if jax.process_count() == 1 else None,
        )  # fmt: skip
        return encoder, None

    def sample_options(self, cfg: Any, encoder: Any) -> dict:
        """The run's Qwen embedder and cache, the items' own sizes."""
        return dict(text_encoder=encoder.text, cache_dir=encoder.cache_dir, size_level=None)

    def precompute(self, folder: Any, preset: configs.Preset, data: Any, out: Any, batch: int, mesh: str,
                   shard_size: int = 256):  # fmt: skip
        """Each item's Qwen2.5-VL outputs: a qwen_cache (of a manifest folder; a packed dataset: not yet)."""
        from jaxedit.data import records
        from jaxedit.step1x.precompute import precompute_qwen

        if records.is_packed(data.path):
            raise ValueError(f"{data.path} is a packed dataset: Step1X-Edit's Qwen cache of packed datasets is not "
                             "written yet (precompute from the manifest folder, or train without a cache)")  # fmt: skip

        return precompute_qwen(folder, data, out, batch, mesh)

    # -- planner

    def text_tokens(self, preset: configs.Preset) -> int:
        from jaxedit.step1x.text import QwenEmbedderConfig

        return QwenEmbedderConfig().max_length

    def train_text(self, preset: configs.Preset, batch: int, tokens: int) -> dict[str, tuple[tuple, str]]:
        txt = (batch, tokens, preset.connector.in_channels)
        return {"txt": (txt, "float32"), "txt_mask": ((batch, tokens), "int32")}

    def infer_text(self, preset: configs.Preset, batch: int, tokens: int, array) -> tuple:
        """(txt, txt_mask, t) of `Step1XEdit`."""
        import jax.numpy as jnp

        return (array((batch, tokens, preset.connector.in_channels)), array((batch, tokens), jnp.int32),
                array((batch,), jnp.float32))  # fmt: skip

    def sample_inputs(self, pipe, batch: int, h: int, w: int, steps: int, *, references: int, text_tokens: int,
                      quantize: str | None) -> tuple:  # fmt: skip
        return pipe.sample_inputs(batch, h, w, steps, text_tokens=text_tokens, quantize=quantize)

    def lower_text(self, preset: configs.Preset, args: Any, mesh: Any, batch: int, array, replicated):
        """`batch` items through the Qwen2.5-VL vision tower and language model (bfloat16 weights and compute,
        as the embedder runs it). The images' patches are one packed row (replicated; their attention heads
        split over tensor), the prompts are split over the batch axes."""
        import jax
        import jax.numpy as jnp

        from jaxedit.models import qwen2_5_vl as Q
        from jaxedit.parallel import sharding as sh

        if preset.qwen is None:
            raise ValueError(f"preset {preset.name} has no Qwen2.5-VL config")
        q = qwen_shapes(preset, args)
        patches = batch * q["image_features"] * preset.qwen.vision.spatial_merge_size**2
        model = Q.QwenVL(preset.qwen, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=args.attention)
        params = sh.abstract_with_shardings(Q.abstract_params(preset.qwen, jnp.bfloat16, boxed=True), mesh)
        i32 = jnp.int32
        vision = {
            "patches": replicated((1, patches, preset.qwen.vision.patch_dim), jnp.bfloat16),
            "pos": replicated((1, patches, 2), i32), "seg_image": replicated((1, patches), i32),
            "seg_window": replicated((1, patches), i32),
        }  # fmt: skip
        lt = q["qwen_tokens"]
        ids, mask, index = (array((batch, lt), jnp.int32) for _ in range(3))
        row_spec = jax.sharding.PartitionSpec(None, *sh.batch_sharding(mesh, 2).spec)  # [3, B, L]: batch second
        pos = jax.ShapeDtypeStruct((3, batch, lt), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, row_spec))
        with sh.activate(mesh):
            fn = lambda p, *a: model.apply({"params": p}, *a)  # noqa: E731
            return jax.jit(fn).lower(params, ids, pos, mask, vision, index), q


def qwen_shapes(preset: configs.Preset, args: Any) -> dict:
    """The Qwen2.5-VL program per item: the reference image resized as the embedder does (at most max_pixels:
    324 merged patches), the prompt's tokens (system prompt + PREFIX + instruction + image)."""
    from jaxedit.qwen_vl import bucket, smart_resize
    from jaxedit.step1x.text import QwenEmbedderConfig

    e, v = QwenEmbedderConfig(), preset.qwen.vision
    factor = v.patch_size * v.spatial_merge_size
    h, w = smart_resize(args.resolution, args.resolution, factor, e.min_pixels, e.max_pixels)
    units = (h // factor) * (w // factor)
    tokens = args.text_tokens or bucket(e.drop_tokens + units + 64, 64)  # 64: the instruction and chat tail
    return dict(image_px=(h, w), image_features=units, qwen_tokens=tokens)


FAMILY = Step1X()
