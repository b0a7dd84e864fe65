"""Step1X-Edit editing pipeline (S1X `inference.py` ImageGenerator.generate_image).

    pipe = Step1XEditPipeline.load("/models/jax/step1x-edit")          # its qwen/ holds the JAX Qwen2.5-VL
    images = pipe([Image.open("cat.png")], ["make the cat wear a hat"], seeds=[0])

Steps: the reference image is resized to about size_level^2 pixels (aspect kept, sides
floored to 16; PIL bicubic), scaled to [-1, 1] and VAE-encoded (float32, the latent mean;
the reference samples the posterior); Qwen2.5-VL embeds (instruction, image) and ("", image)
(`jaxedit.step1x.text`); the target starts from per-item seeded noise of the same size, its
ids equal the reference's (index 0); one jitted program runs the whole Euler loop with
classifier-free guidance on the batch [prompts | negative prompts], w = 6.0 by default,
reference tokens held fixed (`jaxedit.step1x.sampling.denoise_cfg`); decode, clip, truncate
to uint8 as torchvision's to_pil_image, and resize back to the input's size (bicubic).

Qwen2.5-VL runs in JAX (`jaxedit.step1x.text.Step1XQwenEmbedder` on the folder's qwen/; no
torch); without it (`load(..., text_encoder=False)`) pass the embeddings yourself:
`llm=(embeddings [2B, L, C], mask [2B, L])`, rows 0..B-1 for the prompts and B..2B-1 for the
negative prompts (e.g. from `Step1XQwenEmbedder.encode` or its cache files).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxedit import configs, sampling, step_cache
from jaxedit.model_folder import ModelFolder
from jaxedit.models.step1x import Step1XEdit
from jaxedit.options import max_image_tokens
from jaxedit.parallel import placement
from jaxedit.parallel import sharding as sh
from jaxedit.pipelines.base import (
    EditPipelineBase,
    LoadPlan,
    block_bytes,
    check_side,
    resident_bytes,
    to_images,
    to_model_input,
)
from jaxedit.step1x.sampling import denoise_cfg, model_fn, step1x_size

DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SIZE_LEVEL = 28, 6.0, 512  # S1X inference.py defaults
FAMILY = "step1x-edit"


@dataclasses.dataclass
class Step1XPrepared:
    """One preprocessed item: the resized reference (model input and the PIL image Qwen sees)."""

    reference: np.ndarray  # [H, W, 3] float32 in [-1, 1]
    image: Image.Image  # the same pixels, for the Qwen2.5-VL embedder
    width: int
    height: int
    out_size: tuple[int, int] | None = None  # (w, h) the output is resized to; None: keep (width, height)

    @property
    def bucket(self) -> tuple:
        return (self.width, self.height)

    @property
    def references(self) -> tuple[np.ndarray]:
        """The item's reference images (Step1X-Edit: its one)."""
        return (self.reference,)


def to_pil_truncated(images_BHWC: np.ndarray, sizes: dict | None = None) -> list[Image.Image]:
    """[-1, 1] float images -> PIL, clip then x*255 truncated to uint8 (torchvision to_pil_image), each resized
    (bicubic) to its entry of `sizes` ({index: (w, h) or None: kept}); NonFiniteError if an item holds NaN or inf."""

    def convert(a, i):
        im, size = Image.fromarray(((np.clip(a, -1, 1) * 0.5 + 0.5) * 255).astype(np.uint8)), (sizes or {}).get(i)
        return im.resize(size, Image.Resampling.BICUBIC) if size else im

    return to_images(images_BHWC, convert)


class Step1XEditPipeline(EditPipelineBase):
    """Step1X-Edit editing with a jaxedit model folder of family "step1x-edit".

    text_encoder: a `jaxedit.step1x.text.Step1XQwenEmbedder` (or None: pass `llm=`).
    size_level: working area size_level^2 (None: the input size floored to 16).
    cache_dir: where the embedder caches each item's Qwen output (None: no cache).
    max_image_tokens: None, or the most target + reference tokens an item may have (`load`: the folder's).
    """

    max_image_tokens: int | None = None
    step_caching = True  # `denoise_loop` takes a step cache (`jaxedit.step_cache`)

    def __init__(
        self,
        preset: configs.Preset,
        params: dict[str, Any],
        text_encoder=None,
        *,
        dtype: Any = jnp.bfloat16,
        vae_dtype: Any = jnp.float32,
        size_level: int | None = DEFAULT_SIZE_LEVEL,
        cache_dir: str | Path | None = None,
        devices: list | None = None,
        mesh: configs.MeshConfig | str | None = None,
        scheduler: configs.FluxSchedulerConfig | dict | str | None = None,
    ):
        if preset.connector is None:
            raise ValueError(f"preset {preset.name} has no connector: not a Step1X-Edit model")
        super().__init__(preset, params, vae_dtype=vae_dtype, devices=devices, mesh=mesh)
        self.text_encoder, self.size_level, self.cache_dir = text_encoder, size_level, cache_dir
        self.default_steps, self.default_guidance = DEFAULT_STEPS, DEFAULT_GUIDANCE
        self.set_scheduler(scheduler)  # FLUX.1's schedule (`--scheduler`, the folder option)
        self.model = Step1XEdit(preset.transformer, connector_cfg=preset.connector, dtype=dtype, param_dtype=dtype)
        self.denoise = jax.jit(self.denoise_loop)

    @classmethod
    def load(cls, folder: str | Path | ModelFolder, **kw) -> Step1XEditPipeline:
        """Load a model folder (`EditPipelineBase.load`: dtype (DiT and connector), compile_cache, quantize (the
        DiT), mesh (the DiT, connector, VAE and Qwen2.5-VL are placed on it), devices). qwen: another model folder
        whose converted Qwen2.5-VL to use. text_encoder: True loads the Qwen2.5-VL embedder (JAX, `qwen_dtype`),
        False skips it (then every call needs `llm=`), or an embedder to use. Further kw: the constructor's
        (size_level: default the folder's option)."""
        return super().load(folder, **kw)

    @classmethod
    def load_plan(cls, opened: ModelFolder, dtype: Any, quantize: str | None, kw: dict) -> LoadPlan:
        from jaxedit.step1x.text import open_qwen_folder, qwen_section

        options = {"qwen": kw.pop("qwen", None), "text_encoder": kw.pop("text_encoder", True),
                   "qwen_dtype": kw.pop("qwen_dtype", "bfloat16")}  # fmt: skip
        preset = opened.preset
        if preset.connector is None:
            raise ValueError(f"{opened.path}: a {FAMILY!r} model folder without a connector config")
        if opened.options.get("loras"):
            raise ValueError(f"{opened.json_path}: pipeline.loras: LoRAs apply to FLUX models, not Step1X-Edit")
        qwen_cfg = None
        if options["text_encoder"] is True:
            try:
                options["qwen_folder"] = opened if options["qwen"] is None else open_qwen_folder(options["qwen"])
                qwen_cfg = qwen_section(options["qwen_folder"]).model
            except (FileNotFoundError, ValueError):
                pass  # load_qwen_embedder says what is missing
        quantized = opened.quantized.get("transformer") or quantize
        footprint = cls.footprint(preset, dtype, quantized, qwen_cfg, options["qwen_dtype"])
        return LoadPlan(footprint, {"transformer": dtype}, None, options)

    @classmethod
    def load_text(cls, opened: ModelFolder, plan: LoadPlan, params: dict, mesh: jax.sharding.Mesh):
        """The Qwen2.5-VL embedder (checked against the connector as it loads), the one given, or None."""
        from jaxedit.step1x.text import load_qwen_embedder

        text_encoder, preset = plan.options["text_encoder"], opened.preset
        if text_encoder is True:
            qwen = plan.options.get("qwen_folder") or plan.options["qwen"]
            return load_qwen_embedder(opened, qwen, dtype=plan.options["qwen_dtype"], mesh=mesh)
        embedder = None if text_encoder is False else text_encoder
        if embedder is not None and embedder.config.hidden_size != preset.connector.in_channels:
            raise ValueError(
                f"{opened.path}: Qwen2.5-VL hidden size {embedder.config.hidden_size} != the connector's in_channels "
                f"{preset.connector.in_channels}"
            )
        return embedder

    @classmethod
    def folder_defaults(cls, options: dict) -> dict:
        return {"size_level": options.get("size_level", DEFAULT_SIZE_LEVEL), "scheduler": options.get("scheduler")}

    def loaded(self, opened: ModelFolder, plan: LoadPlan) -> None:
        self.max_image_tokens = max_image_tokens(opened.options)

    @staticmethod
    def footprint(
        preset: configs.Preset, dtype: Any, quantize: str | None, qwen_cfg=None, qwen_dtype: Any = "bfloat16"
    ) -> placement.Footprint:
        """What `mesh="auto"` places by: the weights the devices hold (DiT + connector, VAE and the Qwen2.5-VL
        of `qwen_cfg` if given), one typical edit (512 px, Qwen's 640 tokens)."""
        weights = resident_bytes(preset, {"transformer": (dtype, quantize), "vae": (None, None)})
        if qwen_cfg is not None:
            from jaxedit.models.qwen2_5_vl import abstract_params as qwen_params

            weights += placement.tree_bytes(qwen_params(qwen_cfg, jnp.dtype(qwen_dtype)))
        return placement.Footprint(weights, 2 * 1024 + 640, block_bytes(preset, dtype, quantize))

    # ----------------------------------------------------------------------------------
    # the EditPipeline protocol of jaxedit.pipelines.batch

    def sizes(
        self, size: tuple[int, int] | None, width: int | None = None, height: int | None = None
    ) -> tuple[int, int, tuple[int, int] | None]:
        """(working width, height, output size or None: the working size) for an image of `size`. Raises
        ValueError on bad sizes."""
        if size is None:
            raise ValueError("Step1X-Edit edits an input image (no text-to-image)")
        out_size = None
        if width or height:
            w, h = sampling.floor_size(width or size[0], height or size[1])
        elif self.size_level:
            w, h = step1x_size(size[0], size[1], self.size_level)
            out_size = tuple(size)
        else:
            w, h = sampling.floor_size(*size)
            out_size = tuple(size)
        check_side("width", w)
        check_side("height", h)
        tokens = 2 * (w // 16) * (h // 16)  # the target's and the reference's
        if self.max_image_tokens is not None and tokens > self.max_image_tokens:
            raise ValueError(f"a {w}x{h} edit makes {tokens} image tokens (target and reference), over the maximum "
                             f"of {self.max_image_tokens} (max_image_tokens: --max-tokens, else the model folder's): "
                             "use a smaller image or size_level")  # fmt: skip
        return w, h, None if out_size == (w, h) else out_size

    def bucket_for(self, size: tuple[int, int] | None, width: int | None = None, height: int | None = None) -> tuple:
        """The `Step1XPrepared.bucket` of an image of `size`, from the size alone (nothing decoded)."""
        w, h, _ = self.sizes(size, width, height)
        return (w, h)

    def prepare(self, image: Image.Image | None, width: int | None = None, height: int | None = None):
        """Resize the reference image to the working size. Explicit width/height (floored to 16)
        set it and the output size; otherwise the output is resized back to the input's size."""
        w, h, out_size = self.sizes(None if image is None else image.size, width, height)
        image = image.convert("RGB")
        if image.size != (w, h):
            image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
        return Step1XPrepared(to_model_input(image), image, w, h, out_size)

    # ----------------------------------------------------------------------------------

    def encode_prompts(
        self, prepared: list[Step1XPrepared], prompts: list[str], negative_prompt: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        """Qwen2.5-VL of [prompts | negative prompts], each with its item's image:
        (embeddings [2B, L, C], mask [2B, L])."""
        if self.text_encoder is None:
            raise ValueError("no Qwen2.5-VL text encoder loaded: pass llm=(embeddings, mask)")
        texts = list(prompts) + [negative_prompt] * len(prompts)
        return self.text_encoder.encode(texts, [p.image for p in prepared] * 2, cache_dir=self.cache_dir)

    def conditioning(self, prepared, prompts, *, negative_prompt: str = "", llm=None):
        """Qwen2.5-VL of the prompts and of the negative prompt (classifier-free guidance), each with its item's
        image; llm: those (embeddings [2B, L, C], mask [2B, L]) given instead."""
        b = len(prompts)
        emb, mask = llm if llm is not None else self.encode_prompts(prepared, prompts, negative_prompt)
        c = self.preset.connector.in_channels
        if emb.ndim != 3 or emb.shape[0] != 2 * b or emb.shape[2] != c or mask.shape != emb.shape[:2]:
            raise ValueError(
                f"llm embeddings {emb.shape} / mask {mask.shape}: expected [{2 * b}, L, {c}] / [{2 * b}, L]"
            )
        return np.asarray(emb, np.float32), np.asarray(mask, np.int32)

    def denoise_args(self, bp, text, x, refs, img_ids, guidance, timesteps) -> tuple:
        (emb, mask), batch, b = text, bp.put, len(text[0]) // 2
        return (bp.params["transformer"], x, refs, img_ids, batch(emb[:b]), batch(mask[:b]), batch(emb[b:]),
                batch(mask[b:]), guidance, timesteps)  # fmt: skip

    def output_images(self, images_BHWC: np.ndarray, prepared: list) -> list[Image.Image]:
        """Clipped and truncated as torchvision's to_pil_image, each resized back to its item's output size."""
        return to_pil_truncated(images_BHWC, {i: p.out_size for i, p in enumerate(prepared)})

    def sample_inputs(
        self, batch: int, h: int, w: int, steps: int, *, text_tokens: int, quantize: str | None = None
    ) -> tuple[jax.sharding.Mesh, tuple]:
        """(mesh, arguments of `denoise`) as ShapeDtypeStructs placed as `generate` places them for `batch` items
        of h x w latent cells and `text_tokens` Qwen tokens: the program `jaxedit plan` compiles."""
        mesh, size = self.batch_mesh(batch)
        cfg, f32, nt = self.preset.transformer, jnp.float32, (h // 2) * (w // 2)

        def b(shape, dtype=f32):
            return jax.ShapeDtypeStruct((size, *shape), dtype, sharding=sh.batch_sharding(mesh, 1 + len(shape)))

        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        llm = (b((text_tokens, self.preset.connector.in_channels)), b((text_tokens,), jnp.int32))
        return mesh, (
            self.abstract_part("transformer", self.model.dtype, quantize, mesh), b((nt, cfg.in_channels)),
            b((nt, cfg.in_channels)), b((2 * nt, 3)), *llm, *llm, b(()),
            jax.ShapeDtypeStruct((steps + 1,), f32, sharding=rep),
        )  # fmt: skip

    def denoise_loop(self, tparams, x, ref_tokens, img_ids, llm_c, mask_c, llm_u, mask_u, guidance, timesteps, *,
                     cache=None):  # fmt: skip
        """The whole CFG Euler loop (one XLA program): packed target tokens -> final packed tokens (a step cache,
        `jaxedit.step_cache`: and which steps each item reused)."""
        parts = None if cache is None else step_cache.dit_parts(self.model, tparams, cache.first)
        return denoise_cfg(
            model_fn(self.model, tparams), x, ref_tokens, img_ids, llm_c, mask_c, llm_u, mask_u, timesteps,
            guidance[:, None, None], cache=cache, parts=parts,
        )  # fmt: skip
