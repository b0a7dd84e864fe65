"""Qwen-Image-Edit editing pipeline (diffusers `QwenImageEditPlusPipeline`, 2509 and 2511) on the shared template
(`jaxedit.pipelines.base.EditPipelineBase`).

An item is an instruction and 1-3 reference images. Each reference is resized twice, keeping its aspect ratio
(`calculate_dimensions`: sides multiples of 32): to about 384 x 384 px for Qwen2.5-VL ("Picture i:") and to about
1024 x 1024 px for the VAE. The target takes the size of about 1024 x 1024 px at the last reference's aspect (or
the width/height given), floored to 16. The transformer sees [target | reference 1 | ...] latent tokens (each
image packed 2x2 alone, positions from the images' shapes) and Qwen's last hidden states of the instruction with
the references (their mask); true classifier-free guidance runs a second pass on the negative prompt (default
" ", scale 4: the model cards' settings), rescaled to the conditional prediction's norm.

    pipe = QwenImageEditPipeline.load("models/qwen-image-edit-2511")
    images = pipe([[photo]], ["make the sky purple"], seeds=[0])
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxedit import configs, sampling, step_cache
from jaxedit.lora import Lora, check_scale, merge_now, read_lora
from jaxedit.model_folder import ModelFolder
from jaxedit.options import folder_loras, max_image_tokens
from jaxedit.parallel import placement
from jaxedit.pipelines.base import (
    EditPipelineBase,
    LoadPlan,
    block_bytes,
    check_side,
    resident_bytes,
    to_images,
    to_model_input,
)
from jaxedit.qwen_image import sampling as qs
from jaxedit.qwen_image.text import calculate_dimensions, condition_image

DEFAULT_STEPS, DEFAULT_TRUE_CFG, DEFAULT_NEGATIVE = 40, 4.0, " "  # the model cards' example settings
CONDITION_AREA, VAE_AREA = 384 * 384, 1024 * 1024


@dataclasses.dataclass
class QwenPrepared:
    """One preprocessed item: its references at the VAE's size and at Qwen2.5-VL's, and the target size."""

    references: tuple[np.ndarray, ...]  # each [H_i, W_i, 3] float32 in [-1, 1]
    condition_images: tuple[Image.Image, ...]  # what Qwen2.5-VL sees
    width: int
    height: int

    @property
    def bucket(self) -> tuple:
        return (self.width, self.height, tuple(r.shape[:2] for r in self.references))


def to_pil(images_BHWC: np.ndarray) -> list[Image.Image]:
    """[-1, 1] float images -> PIL (diffusers' postprocess: x / 2 + 0.5 clipped, x 255 rounded)."""
    return to_images(images_BHWC, lambda a, _: Image.fromarray((np.clip(a / 2 + 0.5, 0, 1) * 255).round().astype("u1")))


def _scale(v) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 1:
        raise ValueError(f"true_cfg_scale must be a number >= 1 (1: off), got {v!r}")
    return float(v)


class QwenImageEditPipeline(EditPipelineBase):
    """params: {"transformer", "vae"}; text_encoder: a `jaxedit.qwen_image.text.QwenImageEmbedder` (None: every
    call passes `llm=`). max_image_tokens: the most image tokens (16 x 16 px each) an item may have."""

    several_references = True  # (jaxedit.pipelines.batch: items may have 1-3 images; `sizes` checks the count)
    step_caching = True  # `denoise_loop` takes a step cache (`jaxedit.step_cache`)
    scheduler_type = configs.SchedulerConfig  # diffusers' FlowMatchEulerDiscreteScheduler's fields (`qs.schedule`)
    # TeaCache's rescaling polynomial: none fitted to Qwen-Image here (FLUX.1-dev's does not transfer), so `tea:T`
    # accumulates the plain relative L1 change of the first block's modulated input: calibrate T on your images
    tea_rescale = None

    def __init__(
        self,
        preset: configs.Preset,
        params: dict[str, Any],
        text_encoder=None,
        *,
        dtype: Any = jnp.bfloat16,
        vae_dtype: Any = jnp.float32,
        max_image_tokens: int | None = None,
        scheduler: qs.SchedulerConfig | dict | str | None = None,
        devices: list | None = None,
        mesh: configs.MeshConfig | str | None = None,
    ):
        from jaxedit.models.qwen_image import QwenImageTransformer

        super().__init__(preset, params, vae_dtype=vae_dtype, devices=devices, mesh=mesh)
        self.text_encoder, self.max_image_tokens = text_encoder, max_image_tokens
        self.set_scheduler(scheduler)
        self.default_steps, self.default_guidance = DEFAULT_STEPS, 1.0  # (no embedded guidance)
        self.true_cfg_scale, self.negative_prompt = DEFAULT_TRUE_CFG, DEFAULT_NEGATIVE
        self.model = QwenImageTransformer(preset.transformer, dtype=dtype, param_dtype=dtype)
        self.loras: list[tuple[Lora, float, bool]] = []  # (LoRA, scale, merged) in the order they were added
        self.denoise = jax.jit(self.denoise_loop, static_argnums=(8,))

    # -- load (the template's hooks)

    @classmethod
    def load(cls, folder: str | Path | ModelFolder, **kw) -> QwenImageEditPipeline:
        """Load a model folder (`EditPipelineBase.load`: dtype, compile_cache, quantize, mesh, devices). qwen:
        another model folder whose converted Qwen2.5-VL to use; text_encoder: True loads it (JAX, `qwen_dtype`),
        False skips it (then every call passes `llm=`), or an embedder to use. Further kw: the constructor's."""
        return super().load(folder, **kw)

    @classmethod
    def load_plan(cls, opened: ModelFolder, dtype: Any, quantize: str | None, kw: dict) -> LoadPlan:
        options = {"qwen": kw.pop("qwen", None), "text_encoder": kw.pop("text_encoder", True),
                   "qwen_dtype": kw.pop("qwen_dtype", "bfloat16"), "loras": kw.pop("loras", ())}  # fmt: skip
        quantized = opened.quantized.get("transformer") or quantize
        qwen_cfg = None  # the Qwen2.5-VL the pipeline will hold: the folder's (or the `qwen` folder's) "qwen" entry
        if options["text_encoder"] is True:
            from jaxedit.qwen_image.text import qwen_section

            try:
                qwen_cfg = qwen_section(ModelFolder.of(options["qwen"] or opened)).model
            except (FileNotFoundError, ValueError):
                pass  # load_qwen_image_embedder says what is missing
        footprint = cls.footprint(opened.preset, dtype, quantized, qwen_cfg, options["qwen_dtype"])
        return LoadPlan(footprint, {"transformer": dtype}, None, options)

    @classmethod
    def load_text(cls, opened: ModelFolder, plan: LoadPlan, params: dict, mesh: jax.sharding.Mesh):
        text_encoder = plan.options["text_encoder"]
        if text_encoder is True:
            from jaxedit.qwen_image.text import load_qwen_image_embedder

            qwen = plan.options["qwen"] or opened
            return load_qwen_image_embedder(qwen, dtype=plan.options["qwen_dtype"], mesh=mesh)
        return None if text_encoder is False else text_encoder

    @classmethod
    def folder_defaults(cls, options: dict) -> dict:
        return {"max_image_tokens": max_image_tokens(options), "scheduler": options.get("scheduler")}

    def loaded(self, opened: ModelFolder, plan: LoadPlan) -> None:
        """The folder's true CFG and LoRAs, then the load's LoRAs (merged into the DiT's weights)."""
        options = opened.options
        for path, scale, merged in folder_loras(opened.path, options):
            self.add_lora(path, scale, merge=merged)
        for lora, scale in plan.options["loras"]:
            self.add_lora(lora, scale)
        self.set_true_cfg(
            options.get("true_cfg_scale", DEFAULT_TRUE_CFG), options.get("negative_prompt", DEFAULT_NEGATIVE)
        )

    @staticmethod
    def footprint(
        preset: configs.Preset, dtype: Any, quantize: str | None, qwen_cfg=None, qwen_dtype: Any = "bfloat16"
    ) -> placement.Footprint:
        """What `mesh="auto"` places by: the DiT, the VAE and the Qwen2.5-VL of `qwen_cfg` if given; one typical
        edit (a 1024 px target and reference, ~300 text tokens)."""
        weights = resident_bytes(preset, {"transformer": (dtype, quantize), "vae": (None, None)})
        if qwen_cfg is not None:
            from jaxedit.models.qwen2_5_vl import abstract_params as qwen_params

            weights += placement.tree_bytes(qwen_params(qwen_cfg, jnp.dtype(qwen_dtype)))
        return placement.Footprint(weights, 2 * 4096 + 300, block_bytes(preset, dtype, quantize))

    def add_lora(self, lora: Lora | str | Path, scale: float = 1.0, *, merge: bool = True) -> Lora:
        """Merge a LoRA file (any layout `jaxedit.lora` reads for Qwen-Image: diffusers/PEFT, Lightning's
        lora_down/up/alpha, ComfyUI, kohya; LoraError naming the file and key if it does not fit) into the DiT's
        weights with `scale`. Returns the LoRA."""
        if not merge:
            raise ValueError("Qwen-Image-Edit LoRAs are merged into the weights at load (merge=False: not yet)")
        lora = lora if isinstance(lora, Lora) else read_lora(lora, self.preset)
        scale = check_scale(scale)
        merged = merge_now(self.params["transformer"], [lora.updates.get("transformer", ())], [scale])
        self.params = self.params | {"transformer": merged}
        self.loras.append((lora, scale, True))
        return lora

    def lora_identity(self) -> list[dict]:
        """What the LoRAs make of the model: each file's sha256, scale and whether it is merged."""
        return [{"sha256": lo.sha256, "scale": s, "merged": m} for lo, s, m in self.loras]

    def set_true_cfg(self, scale: float, negative_prompt: str | None = DEFAULT_NEGATIVE) -> None:
        """Default true-CFG scale (1: off) and negative prompt (None: off) of later edits."""
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        self.true_cfg_scale, self.negative_prompt = _scale(scale), negative_prompt

    # -- the EditPipeline protocol of jaxedit.pipelines.batch

    def sizes(self, size, width: int | None = None, height: int | None = None) -> tuple[list, int, int]:
        """([(w, h) at the VAE's size of each reference], target width, target height) for references of `size`
        (one (w, h) or a list of 1-3). ValueError on bad sizes or too many tokens."""
        sizes = [size] if isinstance(size, tuple) else list(size or [])
        if not 1 <= len(sizes) <= self.family.max_references:
            raise ValueError(f"{self.family.title} edits 1 to {self.family.max_references} reference images, "
                             f"got {len(sizes)}")  # fmt: skip
        refs = []
        for i, (w, h) in enumerate(sizes):
            if w < 1 or h < 1:
                raise ValueError(f"reference {i + 1}: image {w}x{h} is empty")
            refs.append(calculate_dimensions(VAE_AREA, w / h))
        tw, th = calculate_dimensions(VAE_AREA, sizes[-1][0] / sizes[-1][1])
        width, height = sampling.floor_size(width or tw, height or th)
        check_side("width", width)
        check_side("height", height)
        tokens = sum(w * h for w, h in [(width, height), *refs]) // 256
        if self.max_image_tokens is not None and tokens > self.max_image_tokens:
            raise ValueError(
                f"{len(refs)} reference(s) and the target make {tokens} image tokens, over the maximum "
                f"of {self.max_image_tokens} (max_image_tokens: --max-tokens, else the model folder's)"
            )
        return refs, width, height

    def bucket_for(self, size, width: int | None = None, height: int | None = None) -> tuple:
        refs, width, height = self.sizes(size, width, height)
        return (width, height, tuple((h, w) for w, h in refs))

    def prepare(self, image, width: int | None = None, height: int | None = None) -> QwenPrepared:
        """Resize the reference image(s) (one, or a list of 1-3) for the VAE and for Qwen2.5-VL (Lanczos, as
        diffusers' image processor) and fix the target size."""
        images = [image] if isinstance(image, Image.Image) else list(image or [])
        refs, width, height = self.sizes([im.size for im in images], width, height)
        vae, cond = [], []
        for im, ref in zip(images, refs):
            im = im.convert("RGB")
            vae.append(to_model_input(im.resize(ref, resample=Image.Resampling.LANCZOS)))
            cond.append(condition_image(im, CONDITION_AREA))
        return QwenPrepared(tuple(vae), tuple(cond), width, height)

    # -- the template's generate hooks

    def schedule(self, steps: int, image_seq_len: int) -> np.ndarray:
        return qs.schedule(steps, image_seq_len, self.scheduler)

    def image_ids(self, h2: int, w2: int, grids: list) -> None:
        return None  # positions come from the images' shapes (`img_shapes`)

    def conditioning(self, prepared, prompts, *, true_cfg_scale=None, negative_prompt=None, llm=None,
                     negative_llm=None):  # fmt: skip
        """Qwen2.5-VL of the prompts with each item's references, and with true CFG on (scale > 1 and a negative
        prompt) of the negative prompt. llm / negative_llm: those (embeddings [B, L, D], mask [B, L]) given."""
        b = len(prompts)
        scale = self.true_cfg_scale if true_cfg_scale is None else _scale(true_cfg_scale)
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        images = [p.condition_images for p in prepared]
        if llm is None:
            if self.text_encoder is None:
                raise ValueError("no Qwen2.5-VL text encoder loaded: pass llm=(embeddings, mask)")
            llm = self.text_encoder.encode(list(prompts), images, resize=False)  # (resized in `prepare`)
        on = scale > 1 and (negative is not None or negative_llm is not None)
        if on and negative_llm is None:
            if self.text_encoder is None:
                raise ValueError("no Qwen2.5-VL text encoder loaded: pass negative_llm=(embeddings, mask)")
            negative_llm = self.text_encoder.encode([negative] * b, images, resize=False)
        d = self.preset.transformer.joint_attention_dim
        for name, (emb, mask) in (("llm", llm), ("negative_llm", negative_llm if on else llm)):
            if np.ndim(emb) != 3 or emb.shape[0] != b or emb.shape[2] != d or np.shape(mask) != emb.shape[:2]:
                raise ValueError(f"{name} embeddings {np.shape(emb)} / mask {np.shape(mask)}: expected [{b}, L, {d}] "
                                 f"/ [{b}, L]")  # fmt: skip
        f = self.preset.vae.downsample * 2
        first = prepared[0]
        img_shapes = ((1, first.height // f, first.width // f),
                      *((1, r.shape[0] // f, r.shape[1] // f) for r in first.references))  # fmt: skip
        as_arrays = lambda e: (np.asarray(e[0], np.float32), np.asarray(e[1], np.int32))  # noqa: E731
        return {"llm": as_arrays(llm), "negative": as_arrays(negative_llm) if on else None, "scale": scale,
                "img_shapes": img_shapes}  # fmt: skip

    def denoise_args(self, bp, text, x, refs, img_ids, guidance, timesteps) -> tuple:
        put = bp.put
        negative = None if text["negative"] is None else tuple(put(a) for a in text["negative"])
        scale = self.replicated(bp.mesh, np.float32(text["scale"]))
        return (bp.params["transformer"], x, refs, *(put(a) for a in text["llm"]), negative, scale, timesteps,
                text["img_shapes"])  # fmt: skip

    def output_images(self, images_BHWC: np.ndarray, prepared: list) -> list[Image.Image]:
        return to_pil(images_BHWC)

    def denoise_loop(self, tparams, x, refs, txt, mask, negative, scale, times, img_shapes, *,
                     cache: step_cache.CacheSpec | None = None):  # fmt: skip
        """The whole Euler loop with true CFG (one XLA program): packed target tokens -> final packed tokens.
        cache: a step cache (`jaxedit.step_cache`): then (final tokens, reused [steps, B])."""
        dtype = self.model.dtype
        if cache is not None:
            parts = step_cache.dit_parts(self.model, tparams, cache.first, self.tea_rescale)
            return qs.denoise_cached(parts, cache, x, refs, txt, mask, negative, scale, times, img_shapes)

        def model(img, txt_, mask_, t):
            return self.model.apply({"params": tparams}, img.astype(dtype), txt_.astype(dtype), mask_, t, img_shapes)

        return qs.denoise(model, x, refs, txt, mask, negative, scale, times)

    def sample_inputs(
        self, batch: int, h: int, w: int, steps: int, *, references: int = 1, text_tokens: int | None = None,
        quantize: str | None = None,
    ) -> tuple[jax.sharding.Mesh, tuple]:  # fmt: skip
        """(mesh, arguments of `denoise`) as ShapeDtypeStructs placed as `generate` places them for `batch` items
        of h x w latent cells with `references` references of that size and `text_tokens` Qwen tokens (true CFG
        on, the negative prompt as long): the program `jaxedit plan` compiles."""
        from jaxedit.parallel import sharding as sh

        mesh, size = self.batch_mesh(batch)
        cfg, f32, nt = self.preset.transformer, jnp.float32, (h // 2) * (w // 2)
        lt = text_tokens or self.family.text_tokens(self.preset)

        def b(shape, dtype=f32):
            return jax.ShapeDtypeStruct((size, *shape), dtype, sharding=sh.batch_sharding(mesh, 1 + len(shape)))

        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        llm = (b((lt, cfg.joint_attention_dim)), b((lt,), jnp.int32))
        img_shapes = ((1, h // 2, w // 2),) * (1 + references)
        return mesh, (
            self.abstract_part("transformer", self.model.dtype, quantize, mesh), b((nt, cfg.in_channels)),
            b((references * nt, cfg.in_channels)) if references else None, *llm, llm,
            jax.ShapeDtypeStruct((), f32, sharding=rep), jax.ShapeDtypeStruct((2, steps + 1), f32, sharding=rep),
            img_shapes,
        )  # fmt: skip
