"""Qwen-Image-Edit (family "qwen-image-edit": the 2509 and 2511 releases): a 60-block dual-stream MMDiT conditioned
on Qwen2.5-VL-7B's last hidden states of the instruction and the reference image(s) (up to 3, "Picture N:"), the
Qwen-Image VAE (Wan-2.1 style, 16 channels, per-channel latent mean and std), true classifier-free guidance with
norm rescaling, the reference latents packed after the target's.

Its pipeline and conditioning live in `jaxedit.qwen_image`, its models in `jaxedit.models.qwen_image` (+ `_rope`,
`_vae`), its converter in `checkpoints_convert.qwen_image`; this module says what the shared code asks."""

from __future__ import annotations

from typing import Any

from jaxedit import configs
from jaxedit.families import Family, configure_scheduler, configure_true_cfg, scheduler_flag


def _presets() -> tuple[configs.Preset, ...]:
    c = configs
    tiny = c.QwenImageConfig(num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=28,
                             axes_dims_rope=(4, 6, 6))  # fmt: skip
    tiny_vae = c.QwenImageVAEConfig(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    full = {"vae": c.QwenImageVAEConfig(), "qwen": c.QwenVLConfig()}
    return (
        c.Preset("qwen-image-edit-2509", "qwen-image-edit", c.QwenImageConfig(), **full),
        c.Preset("qwen-image-edit-2511", "qwen-image-edit", c.QwenImageConfig(zero_cond_t=True), **full),
        # tiny widths, full structure
        c.Preset("qwen-image-edit-tiny", "qwen-image-edit", tiny, tiny_vae, qwen=c.TINY_QWEN_VL),
    )  # fmt: skip


def loss_call(apply_fn, params, img, img_shapes, txt, mask, t, guidance):
    """The loss's model call: (img, img_shapes, txt, txt_mask, t) with t in [0, 1], the objective's t: the
    pipeline's sigma (x_t = (1 - sigma) x0 + sigma noise), which the transformer gets as timestep / 1000; its
    Euler step x <- x + (sigma_next - sigma) v makes v = noise - x0 the velocity (no guidance embedding)."""
    return apply_fn(params, img, img_shapes, txt, mask, t)


def img_shapes(objective: Any, batch: int, target: tuple[int, int], references: list) -> tuple:
    """The transformer's static img_shapes: (1, rows, cols) in tokens of the target, then each reference."""
    return tuple((1, int(h), int(w)) for h, w in (target, *references))


class QwenImageEdit(Family):
    title = "Qwen-Image-Edit"
    names = ("qwen-image-edit",)
    presets = _presets()
    converter = "checkpoints_convert.qwen_image"
    part_configs = {"transformer": configs.QwenImageConfig, "vae": configs.QwenImageVAEConfig}
    parts = {"transformer": ("qwen_image", "QwenImageTransformer"), "vae": ("qwen_image_vae", "QwenImageVAE")}
    lora_parts = ("transformer",)
    max_references = 3  # the Plus pipeline's "Picture 1..3"
    reference_index = 1.0  # (unused: positions come from the images' shapes, `jaxedit.models.qwen_image_rope`)
    vae_methods = ("encode_normalized", "decode_normalized")  # (z - latents_mean) / latents_std
    cfg_passes = 2  # true CFG on [prompts | negative prompts]

    def example_inputs(self, preset: configs.Preset, part: str) -> tuple:
        if part == "transformer":
            from jaxedit.models import qwen_image

            return qwen_image.example_inputs(preset.transformer)
        if part == "vae":
            from jaxedit.models import qwen_image_vae

            return qwen_image_vae.example_inputs(preset.vae)
        return super().example_inputs(preset, part)

    # -- LoRA files

    def lora_table(self, preset: configs.Preset, part: str, naming: str) -> list | None:
        """The DiT in diffusers' names (`jaxedit.names.qwen_image`, the converter's table): the only names its
        LoRA files use."""
        if (part, naming) != ("transformer", "diffusers") or preset.transformer is None:
            return None
        from jaxedit.names.qwen_image import diffusers_rules

        return diffusers_rules(preset.transformer)

    def lora_targets(self) -> dict:
        """Every block's attention Linears (diffusers' attn.to_q ... attn.to_add_out; to_out.0 is our to_out_0)
        and both streams' MLP Linears (img_mlp.net.0.proj / net.2 are our img_mlp/0 and /2); a trained adapter is
        a LoRA on that diffusers module (`lora_naming`)."""
        from jaxedit.names.qwen_image import ATTN_LINEARS
        from jaxedit.train.lora import Target

        out = {f"attn.{n}": Target("transformer_blocks", "out", (f"attn/{n}",)) for n in ATTN_LINEARS.values()}
        for stream in ("img", "txt"):
            out |= {f"{stream}_mlp.{i}": Target("transformer_blocks", "out", (f"{stream}_mlp/{i}",)) for i in (0, 2)}
        return out

    def lora_keys(self) -> Any:
        """What diffusers' `QwenImageLoraLoaderMixin.load_lora_weights` reads (diffusers 0.42; its
        `_convert_non_diffusers_qwen_lora_to_diffusers`), every module named as diffusers names it:

          diffusers/PEFT  transformer.<module>.lora_A.weight / .lora_B.weight (or .lora.down / .lora.up), an
                          optional PEFT LoraConfig header (`lora_adapter_metadata`)
          bare            <module>.lora_down.weight / .lora_up.weight / .alpha (lightx2v's Qwen-Image-Lightning
                          files), or .lora_A / .lora_B (DiffSynth's also as .lora_A.default.weight)
          ComfyUI         diffusion_model.<module>... (ai-toolkit), as the bare names
          kohya           lora_unet_<module, dots as _>.lora_down.weight / .lora_up.weight / .alpha (musubi-tuner)

        W += (alpha / r) * up @ down; a module without an .alpha has scale 1 (diffusers' converter). diffusers
        reads bare lora_A / lora_B names only in a file where some key has an .alpha (else it finds none of
        them); jaxedit reads them in any file, and any of these suffixes behind any of these prefixes."""
        from jaxedit.lora.formats import KeyLayout

        factors = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
                   (".lora_up.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                   (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
                   (".alpha", "alpha"))  # fmt: skip
        tops = ("transformer_blocks", "img_in", "txt_in", "time_text_embed", "norm_out", "proj_out")
        return KeyLayout(
            described="diffusers/PEFT, bare diffusers names, ComfyUI, kohya",
            prefixes=(
                ("transformer.", "diffusers", "transformer", "diffusers"),
                ("diffusion_model.", "comfyui", "transformer", "diffusers"),
                ("lora_unet_", "kohya", "transformer", "diffusers"),
            ),
            bare={top: ("bare", "diffusers") for top in tops},
            suffixes=factors,
        )

    def description_extra(self, preset: configs.Preset) -> dict | None:
        """The "qwen" entry, no Qwen2.5-VL yet (converted in with the release, or later)."""
        from jaxedit.qwen_image.text import qwen_entry

        return qwen_entry(None)

    # -- pipeline and command line

    def pipeline(self) -> type:
        from jaxedit.qwen_image.pipeline import QwenImageEditPipeline

        return QwenImageEditPipeline

    def footprint(self, preset: configs.Preset, dtype: Any, quantize: str | None, text_on_cpu: bool = False):
        return self.pipeline().footprint(preset, dtype, quantize, preset.qwen)

    def load_options(self, args: Any, preset: configs.Preset) -> dict:
        from jaxedit.lora import lora_args

        refused = [f for f in ("reference_ids", "reference_tokens", "text_on_cpu", "size_level", "keep_size")
                   if getattr(args, f, None)]  # fmt: skip
        if refused:
            flag = refused[0].replace("_", "-")
            raise ValueError(f"--{flag} does not apply to {self.title} models")
        if getattr(args, "scheduler", None) is not None:  # checked before anything loads
            scheduler(args.scheduler)
        kw = {"max_image_tokens": args.max_tokens} if args.max_tokens else {}
        kw |= {"loras": lora_args(args.lora, preset)} if args.lora else {}
        return kw | ({"qwen": args.qwen} if args.qwen else {})

    def configure(self, pipe: Any, args: Any) -> None:
        """--scheduler over the model folder's scheduler; true CFG from --true-cfg-scale / --negative-prompt (the
        other one: the model's)."""
        configure_scheduler(pipe, args)
        configure_true_cfg(pipe, args)

    # -- training (full and LoRA; the Qwen2.5-VL outputs cached per item)

    def check_train(self, cfg: Any) -> None:
        if cfg.data.cache:
            raise ValueError(f"data.cache holds T5/CLIP embeddings; {self.title} caches its Qwen outputs in qwen_cache")
        if cfg.vae_sample:
            raise ValueError(f"vae_sample: {self.title} trains on the VAE's posterior mean (the pipeline's latents)")

    def check_objective(self, objective: Any) -> None:
        """No guidance embedding, and the FLUX resolution shift is not the pipeline's (use `shift`)."""
        if objective.resolution_shift:
            raise ValueError(f"{self.title}: objective.resolution_shift is FLUX's schedule; give a fixed shift")
        if objective.guidance != 1.0:
            raise ValueError(f"{self.title} models have no guidance embedding: leave objective.guidance at 1")

    def conditioning(self) -> Any:
        """Qwen2.5-VL's txt and txt_mask; the images' shapes (target, then each reference) as positions."""
        from jaxedit.train.objective import Conditioning

        return Conditioning(keys=("txt", "txt_mask"), call=loss_call, positions=img_shapes)

    def train_batch_keys(self, objective: Any) -> tuple[str, ...]:
        """With prompt dropout each item's empty prompt's too (empty_txt, empty_mask: Qwen sees the images)."""
        dropout = ("empty_txt", "empty_mask") if objective.prompt_dropout > 0 else ()
        return super().train_batch_keys(objective) + dropout

    def train_inputs(self, preset: configs.Preset, img: Any, img_ids: Any, args: tuple) -> tuple:
        """`QwenImageTransformer(img, txt, txt_mask, t, img_shapes)`: img_ids are the static img_shapes."""
        return (img, *args, img_ids)

    def train_encoder(self, cfg: Any, folder: Any, preset: configs.Preset, parts: dict, batches: Any, mesh: Any):
        """Qwen2.5-VL of (instruction, the item's references), each item's output cached in qwen_cache (default
        <checkpoint_dir>/qwen_cache), and the VAE; prompt dropout: each item's ("", references), computed (and
        cached) by the encoder. mesh: the Qwen weights sharded over it on one process."""
        from pathlib import Path

        import jax

        from jaxedit.qwen_image.encoder import QwenImageEncoder

        cache = cfg.qwen_cache or Path(cfg.checkpoint_dir).absolute() / "qwen_cache"
        encoder = QwenImageEncoder(folder, preset, parts, qwen=cfg.qwen, cache_dir=cache,
                                   empties=cfg.objective.prompt_dropout > 0,
                                   mesh=mesh if jax.process_count() == 1 else None)  # fmt: skip
        return encoder, None

    def sample_options(self, cfg: Any, encoder: Any) -> dict:
        """The run's Qwen2.5-VL embedder."""
        return dict(text_encoder=encoder.text)

    def precompute(self, folder: Any, preset: configs.Preset, data: Any, out: Any, batch: int, mesh: str):
        raise ValueError(f"{self.title}: no precompute yet; training caches each item's Qwen output as it goes")

    # -- planner

    def text_tokens(self, preset: configs.Preset) -> int:
        return 512  # the pipeline's max_sequence_length bound; an instruction with one image is ~300

    def train_text(self, preset: configs.Preset, batch: int, tokens: int) -> dict[str, tuple[tuple, str]]:
        txt = (batch, tokens, preset.transformer.joint_attention_dim)
        return {"txt": (txt, "float32"), "txt_mask": ((batch, tokens), "int32")}

    def sample_inputs(self, pipe, batch: int, h: int, w: int, steps: int, *, references: int, text_tokens: int,
                      quantize: str | None) -> tuple:  # fmt: skip
        return pipe.sample_inputs(batch, h, w, steps, references=references, text_tokens=text_tokens,
                                  quantize=quantize)  # fmt: skip


FAMILY = QwenImageEdit()


def scheduler(text: str, base: Any = None) -> Any:
    """`--scheduler`'s `configs.SchedulerConfig` over `base` (the folder's); ValueError (one line) naming the flag."""
    return scheduler_flag(configs.SchedulerConfig, text, base)
