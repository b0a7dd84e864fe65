"""FLUX.1 Kontext editing pipeline (also FLUX.1 text-to-image when no image is given).

    pipe = KontextPipeline.load("/models/jax/flux-kontext-dev")
    images = pipe([Image.open("cat.png")], ["make the cat wear a hat"], seeds=[0])
    images = pipe([[Image.open("person.png"), Image.open("scene.png")]], ["put the person into the scene"], seeds=[0])

Steps, as BFL `flux/sampling.py` and diffusers `FluxKontextPipeline`: the reference image
is resized to the preferred Kontext resolution nearest in aspect ratio (or kept, floored to
a multiple of 16), LANCZOS, scaled to [-1, 1], VAE-encoded (mean), packed 2x2, given ids
with first coordinate 1; the target (default: the reference's size) starts from per-item
seeded noise; the shifted schedule uses mu from the target token count; the guidance value
goes through the guidance embedding; Euler steps; decode. The whole denoising loop of a
batch is one jitted XLA program; batches are split over the local devices (data parallel).

Several reference images per item (a list instead of an image): with `reference_ids` "community" (the
default: diffusers' community pipeline_flux_kontext_multiple_images) the first is resized as a single
one is and every other one to that same size, LANCZOS, aspect not kept (as that pipeline does); with
the others (`jaxedit.sampling.REFERENCE_IDS`) each is resized as a single one is. Then
(`reference_tokens`) all of an item's references are scaled by one factor, aspect kept, never
enlarged, to fit that many tokens together; each is encoded and packed alone, and the reference
grids get ids per `reference_ids`. The target defaults to the first reference's size. Items of a batch
share the number and sizes of their references (the bucket), and `max_image_tokens` caps target +
reference tokens per item.

True classifier-free guidance (diffusers `true_cfg_scale`, off by default): with a scale > 1
every step also runs the transformer on the negative prompt (default "") and uses
v = v_neg + scale (v - v_neg), as diffusers' FluxKontextPipeline does with a negative prompt.
A model folder can make it its default (pipeline options "true_cfg_scale", "negative_prompt");
it only helps a model trained with prompt dropout (`ObjectiveConfig.prompt_dropout`).

LoRAs (`jaxedit.lora`: diffusers/PEFT, kohya, BFL/ai-toolkit and XLabs files, on the transformer,
CLIP and T5): `add_lora(file, scale, merge=True)` merges one into the weights (no cost per call);
merge=False keeps its factors apart and merges them inside each jitted call, with the scales as
traced arguments, so `generate(..., lora_scales=[...])` changes them per call without recompiling
(the changed kernels are then held twice during a call). A model folder can name default LoRAs:
pipeline option "loras": [{"path": "style.safetensors", "scale": 0.8, "merge": true}], paths relative
to the folder and inside it (a LoRA from elsewhere is passed by the caller: `loras=`, `--lora`).
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
from jaxedit.kontext.sizes import preferred_kontext_size
from jaxedit.lora import Lora, check_scale, merge, merge_now, read_lora
from jaxedit.model_folder import ModelFolder
from jaxedit.models import Flux
from jaxedit.options import folder_loras, max_image_tokens
from jaxedit.parallel import placement
from jaxedit.parallel import sharding as sh
from jaxedit.pipelines.base import (
    EditPipelineBase,
    LoadPlan,
    block_bytes,
    check_side,
    quantized_parts,
    resident_bytes,
    to_images,
    to_model_input,
)

DEFAULT_STEPS, DEFAULT_GUIDANCE = 28, 2.5  # BFL's Kontext guidance; 28 steps as diffusers


@dataclasses.dataclass
class Prepared:
    """One preprocessed item: its reference images (none: text-to-image) and the target size."""

    references: tuple[np.ndarray, ...]  # each [H_i, W_i, 3] float32 in [-1, 1]
    width: int
    height: int

    @property
    def reference(self) -> np.ndarray | None:
        """The first reference (None: text-to-image)."""
        return self.references[0] if self.references else None

    @property
    def bucket(self) -> tuple:
        """(width, height, ((H_i, W_i) of each reference) or None)."""
        return (self.width, self.height, tuple(r.shape[:2] for r in self.references) or None)


def as_list(x) -> list:
    """An item's references as a list: None -> [], one image or (w, h) size -> [it], a list -> itself."""
    if x is None:
        return []
    if isinstance(x, list | tuple) and not (len(x) == 2 and all(isinstance(v, int | np.integer) for v in x)):
        return list(x)
    return [x]


def fit_tokens(sizes: list[tuple[int, int]], tokens: int | None) -> list[tuple[int, int]]:
    """Sizes (w, h) scaled by one factor (aspect kept, never enlarged, floored to 16) so that together they
    have at most `tokens` 16x16-pixel tokens (None: as given). ValueError if a side would fall below 16."""
    total = sum(w * h for w, h in sizes) // 256
    if tokens is None or total <= tokens:
        return list(sizes)
    s = math.sqrt(tokens / total)
    out = [sampling.floor_size(int(w * s), int(h * s)) for w, h in sizes]
    if min(min(o) for o in out) < 16:
        raise ValueError(f"reference_tokens {tokens} is too few for {len(sizes)} reference(s) of {total} tokens")
    return out


def to_pil(images_BHWC: np.ndarray) -> list[Image.Image]:
    """[-1, 1] float images -> PIL, rounding as diffusers' postprocess does; NonFiniteError if an item holds NaN
    or inf (`to_images`)."""
    return to_images(images_BHWC, lambda a, _: Image.fromarray((np.clip(a / 2 + 0.5, 0, 1) * 255).round().astype("u1")))


def _true_cfg_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not np.isfinite(scale) or scale < 1:
        raise ValueError(f"true_cfg_scale must be a number >= 1 (1: off), got {scale!r}")
    return float(scale)


# TeaCache4FLUX's rescaling polynomial of the relative L1 change of the first block's modulated input (ali-vilab/
# TeaCache, fitted to FLUX.1-dev; numpy.poly1d's order): `--cache tea:T` (`jaxedit.step_cache`)
TEACACHE_FLUX_DEV = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


class KontextPipeline(EditPipelineBase):
    """Editing (Kontext, one or several reference images) or text-to-image (no image) with a FLUX-family
    model folder.

    reference_ids: how several references are sized and told apart (`sampling.REFERENCE_IDS`; "community":
        all at the first one's size).
    reference_tokens: None, the references' sizes as `reference_ids` gives them; N, an item's references
        scaled together to at most N tokens (4096: one 1024x1024 reference's).
    max_image_tokens: None, or the most target + reference tokens an item may have (ValueError above).
    """

    several_references = True  # (jaxedit.pipelines.batch: items may have several images)
    reference_ids: str = "community"
    reference_tokens: int | None = None
    max_image_tokens: int | None = None

    step_caching = True  # `denoise_loop` takes a step cache (`jaxedit.step_cache`)

    def __init__(
        self,
        preset: configs.Preset,
        params: dict[str, Any],
        text_encoder,
        *,
        dtype: Any = jnp.bfloat16,
        vae_dtype: Any = jnp.float32,
        auto_resize: bool = True,
        devices: list | None = None,
        reference_ids: str = "community",
        reference_tokens: int | None = None,
        max_image_tokens: int | None = None,
        mesh: configs.MeshConfig | str | None = None,
        scheduler: configs.FluxSchedulerConfig | dict | str | None = None,
    ):
        super().__init__(preset, params, vae_dtype=vae_dtype, devices=devices, mesh=mesh)
        self.text_encoder, self.auto_resize = text_encoder, auto_resize
        if text_encoder is not None and not text_encoder.on_host:
            text_encoder.place(self.mesh, self.part_shardings)
        self.set_references(reference_ids, reference_tokens, max_image_tokens)
        self.default_steps, self.default_guidance = DEFAULT_STEPS, DEFAULT_GUIDANCE
        self.true_cfg_scale, self.negative_prompt = 1.0, ""  # true CFG off
        self.set_scheduler(scheduler)  # FLUX.1's schedule (`--scheduler`, the folder option "scheduler")
        self.model = Flux(preset.transformer, dtype=dtype, param_dtype=dtype)
        self.denoise = jax.jit(self.denoise_loop)
        self.loras: list[tuple[Lora, float, bool]] = []  # (LoRA, scale, merged) in the order they were added

    @classmethod
    def load(cls, folder: str | Path | ModelFolder, **kw) -> KontextPipeline:
        """Load a jaxedit model folder (`EditPipelineBase.load`: dtype, compile_cache, quantize, mesh, devices).
        loras: (file or read LoRA, scale) added after the folder's own, merged into the weights unless merge_loras
        is False. quantize: the DiT and T5. text_on_cpu: keep T5 and CLIP in host memory and run them on the
        host's CPU (default the folder's option "text_on_cpu"): the accelerator then holds only the DiT and the
        VAE (FLUX.1 Kontext in int8 on one 16 GB chip). Further kw: the constructor's (auto_resize,
        reference_ids, reference_tokens, max_image_tokens: default the folder's options)."""
        return super().load(folder, **kw)

    @classmethod
    def load_plan(cls, opened: ModelFolder, dtype: Any, quantize: str | None, kw: dict) -> LoadPlan:
        options = {"loras": kw.pop("loras", ()), "merge_loras": kw.pop("merge_loras", True)}
        text_on_cpu = kw.pop("text_on_cpu", None)
        text_on_cpu = opened.options.get("text_on_cpu", False) if text_on_cpu is None else text_on_cpu
        dtypes = {"transformer": dtype, "t5": dtype, "clip": dtype}
        modes = {p: opened.quantized.get(p) or (quantize if p in ("transformer", "t5") else None) for p in dtypes}
        on_host = {"t5": jax.devices("cpu")[0], "clip": jax.devices("cpu")[0]} if text_on_cpu else None
        return LoadPlan(cls.footprint(opened.preset, dtype, modes, text_on_cpu), dtypes, on_host, options)

    @classmethod
    def load_text(cls, opened: ModelFolder, plan: LoadPlan, params: dict, mesh: jax.sharding.Mesh):
        from jaxedit.kontext.text import FluxTextEncoder, load_tokenizer
        from jaxedit.model_folder import TOKENIZERS

        preset, folder = opened.preset, opened.path
        return FluxTextEncoder(preset.t5, preset.clip, params.pop("t5"), params.pop("clip"),
                               load_tokenizer(folder / TOKENIZERS["t5"]), load_tokenizer(folder / TOKENIZERS["clip"]),
                               dtype=plan.dtypes["t5"])  # fmt: skip

    @classmethod
    def folder_defaults(cls, options: dict) -> dict:
        return {
            "auto_resize": options.get("auto_resize", True),
            "reference_ids": options.get("reference_ids", "community"),  # as the model was trained
            "max_image_tokens": max_image_tokens(options),  # the folder's cap, else from its resolution
            "scheduler": options.get("scheduler"),  # FLUX.1's shifted schedule when absent
        }

    def loaded(self, opened: ModelFolder, plan: LoadPlan) -> None:
        """The T5's quantisation, the folder's true CFG and LoRAs, then the load's LoRAs."""
        self.quantized = quantized_parts(self.params | {"t5": self.text_encoder.t5_params})
        self.set_true_cfg(opened.options.get("true_cfg_scale", 1.0), opened.options.get("negative_prompt", ""))
        for path, scale, merged in folder_loras(opened.path, opened.options):
            self.add_lora(path, scale, merge=merged)
        for lora, scale in plan.options["loras"]:
            self.add_lora(lora, scale, merge=plan.options["merge_loras"])

    @staticmethod
    def footprint(preset: configs.Preset, dtype: Any, modes: dict, text_on_cpu: bool = False) -> placement.Footprint:
        """What `mesh="auto"` places by: the weights the devices hold, one typical edit (1024 px, one reference).
        modes: {part: quantisation mode or None}."""
        resident = {"transformer": (dtype, modes.get("transformer")), "vae": (None, None)}
        resident |= {} if text_on_cpu else {"t5": (dtype, modes.get("t5")), "clip": (dtype, None)}
        return placement.Footprint(resident_bytes(preset, resident), 2 * 4096 + preset.t5.max_length,
                                   block_bytes(preset, dtype, modes.get("transformer")))  # fmt: skip

    def add_lora(self, lora: Lora | str | Path, scale: float = 1.0, *, merge: bool = True) -> Lora:
        """Apply a LoRA file (any layout `jaxedit.lora` reads; LoraError naming the file and key if it does not
        fit the model) with `scale`: merged into the weights now (for good), or, merge=False, kept apart and
        merged inside each call, where `generate(lora_scales=...)` can change its scale. Returns the LoRA."""
        lora = lora if isinstance(lora, Lora) else read_lora(lora, self.preset)
        scale = check_scale(scale)
        if merge:
            for part, updates in lora.updates.items():
                if part == "transformer":
                    self.params = self.params | {"transformer": merge_now(self.params[part], [updates], [scale])}
                else:
                    attr = f"{part}_params"
                    setattr(self.text_encoder, attr, merge_now(getattr(self.text_encoder, attr), [updates], [scale]))
        self.loras.append((lora, scale, merge))
        runtime = tuple(lo.updates.get("transformer", ()) for lo, _, merged in self.loras if not merged)
        self.params = self.place(self.params | {"transformer_loras": runtime})  # merged kernels kept where they were
        if self.text_encoder is not None and self.text_encoder.mesh is not None:
            self.text_encoder.place(self.mesh, self.part_shardings)
        return lora

    @property
    def lora_scales(self) -> list[float]:
        """The default scales of the run-time (unmerged) LoRAs, in the order they were added."""
        return [scale for _, scale, merged in self.loras if not merged]

    def lora_identity(self) -> list[dict]:
        """What the LoRAs make of the model: each file's sha256, scale and whether it is merged."""
        return [{"sha256": lo.sha256, "scale": s, "merged": m} for lo, s, m in self.loras]

    def _runtime_loras(self, scales) -> tuple[dict, tuple | None]:
        """(text encoders' run-time LoRAs for `encode`, the transformer's (updates, scales) or None)."""
        runtime = [lo for lo, _, merged in self.loras if not merged]
        if not runtime:
            if scales:
                raise ValueError(f"lora_scales {scales} given, but the pipeline has no run-time (unmerged) LoRA")
            return {}, None
        scales = self.lora_scales if scales is None else [check_scale(s, "lora_scales item") for s in scales]
        if len(scales) != len(runtime):
            raise ValueError(f"{len(scales)} lora_scales for {len(runtime)} run-time LoRAs")
        scales = np.asarray(scales, np.float32)
        text = {p: (tuple(lo.updates.get(p, ()) for lo in runtime), scales) for p in ("t5", "clip")
                if any(p in lo.updates for lo in runtime)}  # fmt: skip
        return text, (scales if any("transformer" in lo.updates for lo in runtime) else None)

    def set_references(
        self, ids: str = "community", tokens: int | None = None, max_image_tokens: int | None = None
    ) -> None:
        """How later edits treat several references (see the class); ValueError on bad settings."""
        if ids not in sampling.REFERENCE_IDS:
            raise ValueError(f"reference_ids {ids!r}: use one of {', '.join(sampling.REFERENCE_IDS)}")
        for name, v in (("reference_tokens", tokens), ("max_image_tokens", max_image_tokens)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1):
                raise ValueError(f"{name} must be a positive integer (or None), got {v!r}")
        self.reference_ids, self.reference_tokens, self.max_image_tokens = ids, tokens, max_image_tokens

    def set_true_cfg(self, scale: float, negative_prompt: str = "") -> None:
        """Default true-CFG scale (1: off) and negative prompt of later edits."""
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        self.true_cfg_scale, self.negative_prompt = _true_cfg_scale(scale), negative_prompt

    # ----------------------------------------------------------------------------------
    # the EditPipeline protocol of jaxedit.pipelines.batch

    def sizes(self, size, width: int | None = None, height: int | None = None) -> tuple[list, int, int]:
        """([(w, h) of each reference], target width, target height) for images of `size`: one (w, h), a list
        of them (several references) or None (no image). Each reference resized as a single one is, or, with
        `reference_ids` in `sampling.SAME_SIZE_REFERENCE_IDS` ("community"), every one to the first's size (as
        diffusers' community pipeline does: its own size is not read). Raises ValueError on bad sizes or too many
        tokens."""
        sizes, refs = as_list(size), []
        for i, (w, h) in enumerate(sizes):
            if i and self.reference_ids in sampling.SAME_SIZE_REFERENCE_IDS:
                refs.append(refs[0])
                continue
            which = "image" if len(sizes) == 1 else f"reference {i + 1} of {len(sizes)}: image"
            w0, h0 = sampling.floor_size(w, h)
            if w0 < 16 or h0 < 16:
                raise ValueError(f"{which} {w}x{h} is smaller than 16x16")
            ref = preferred_kontext_size(w0, h0) if self.auto_resize else (w0, h0)
            check_side(f"{which.removesuffix('image')}reference width", ref[0])
            check_side(f"{which.removesuffix('image')}reference height", ref[1])
            refs.append(ref)
        if refs:
            width, height = width or refs[0][0], height or refs[0][1]
            refs = fit_tokens(refs, self.reference_tokens)
        width, height = sampling.floor_size(width or 1024, height or 1024)
        check_side("width", width)
        check_side("height", height)
        tokens = sum(w * h for w, h in [(width, height), *refs]) // 256
        if self.max_image_tokens is not None and tokens > self.max_image_tokens:
            raise ValueError(
                f"{len(refs)} reference(s) and the target make {tokens} image tokens, over the maximum of "
                f"{self.max_image_tokens} (max_image_tokens: --max-tokens, else the model folder's): use fewer or "
                "smaller images, or reference_tokens"
            )
        return refs, width, height

    def bucket_for(self, size, width: int | None = None, height: int | None = None) -> tuple:
        """The `Prepared.bucket` of images of `size` (see `sizes`), from the sizes alone (nothing decoded)."""
        refs, width, height = self.sizes(size, width, height)
        return (width, height, tuple((h, w) for w, h in refs) or None)

    def prepare(self, image, width: int | None = None, height: int | None = None) -> Prepared:
        """Resize the reference image(s) (one image, a list of them, or None) and fix the target size. Raises
        ValueError on bad sizes."""
        images = as_list(image)
        refs, width, height = self.sizes([im.size for im in images], width, height)
        out = []
        for im, ref in zip(images, refs):
            if im.size != ref:
                im = im.resize(ref, resample=Image.Resampling.LANCZOS)
            out.append(to_model_input(im))
        return Prepared(tuple(out), width, height)

    # ----------------------------------------------------------------------------------

    def conditioning(self, prepared, prompts, *, true_cfg_scale=None, negative_prompt=None, lora_scales=None):
        """T5 + CLIP of the prompts (and, true CFG on, of the negative prompts). true_cfg_scale and negative_prompt
        (one, or one per item) default to the pipeline's; lora_scales: the scale of each run-time LoRA for this
        call (default: the scales they were added with)."""
        b = len(prompts)
        scale = self.true_cfg_scale if true_cfg_scale is None else _true_cfg_scale(true_cfg_scale)
        negative = self.negative_prompt if negative_prompt is None else negative_prompt
        negative = [negative] * b if isinstance(negative, str) else list(negative)
        if len(negative) != b:
            raise ValueError(f"{b} prompts but {len(negative)} negative prompts")
        text_loras, lora_scales = self._runtime_loras(lora_scales)
        txt, y = self.text_encoder.encode(prompts, loras=text_loras)
        negative = self.text_encoder.encode(negative, loras=text_loras) if scale > 1 else None
        return {"txt": txt, "y": y, "negative": negative, "scale": scale, "lora_scales": lora_scales}

    def denoise_args(self, bp, text, x, refs, img_ids, guidance, timesteps) -> tuple:
        batch, mesh, b = bp.put, bp.mesh, len(text["txt"])
        cfg = None
        if text["negative"] is not None:
            neg_txt, neg_y = text["negative"]
            scale = self.replicated(mesh, np.float32(text["scale"]))
            cfg = (batch(np.asarray(neg_txt)), batch(np.asarray(neg_y)), scale)
        lora = text["lora_scales"]
        lora = None if lora is None else (bp.params["transformer_loras"], self.replicated(mesh, lora))
        txt, y = np.asarray(text["txt"]), np.asarray(text["y"])
        txt_ids = np.zeros((b, txt.shape[1], 3), np.float32)
        return (bp.params["transformer"], x, refs, img_ids, batch(txt), batch(txt_ids), batch(y), guidance, timesteps,
                cfg, lora)  # fmt: skip

    def output_images(self, images_BHWC: np.ndarray, prepared: list) -> list[Image.Image]:
        return to_pil(images_BHWC)

    def sample_inputs(
        self, batch: int, h: int, w: int, steps: int, *, references: int = 1, text_tokens: int | None = None,
        true_cfg: bool = False, quantize: str | None = None,
    ) -> tuple[jax.sharding.Mesh, tuple]:  # fmt: skip
        """(mesh, arguments of `denoise`) as ShapeDtypeStructs placed as `generate` places them for `batch` items
        of h x w latent cells with `references` references of that size: the program `jaxedit plan` compiles."""
        mesh, size = self.batch_mesh(batch)
        cfg, dt, f32 = self.preset.transformer, self.model.dtype, jnp.float32
        nt, lt = (h // 2) * (w // 2), text_tokens or self.preset.t5.max_length
        nr = references * nt

        def b(shape, dtype):
            return jax.ShapeDtypeStruct((size, *shape), dtype, sharding=sh.batch_sharding(mesh, 1 + len(shape)))

        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        txt, y = b((lt, cfg.context_in_dim), dt), b((cfg.vec_in_dim,), dt)
        true_cfg = (txt, y, jax.ShapeDtypeStruct((), f32, sharding=rep)) if true_cfg else None
        return mesh, (
            self.abstract_part("transformer", dt, quantize, mesh), b((nt, cfg.in_channels), f32),
            b((nr, cfg.in_channels), f32) if nr else None, b((nt + nr, 3), f32), txt, b((lt, 3), f32), y, b((), f32),
            jax.ShapeDtypeStruct((steps + 1,), f32, sharding=rep), true_cfg, None,
        )  # fmt: skip

    def denoise_loop(self, tparams, x, ref_tokens, img_ids, txt, txt_ids, y, guidance, timesteps, cfg=None, lora=None,
                     *, cache: step_cache.CacheSpec | None = None):  # fmt: skip
        """The whole Euler loop (one XLA program): packed target tokens -> final packed tokens.
        cfg: None, or (negative txt, negative y, true-CFG scale): a second transformer call per
        step on the negative prompt (same batch sharding as the first). lora: None, or (each run-time
        LoRA's transformer updates, their scales [n]): merged into the weights once, before the loop.
        cache: a step cache (`jaxedit.step_cache`): then (final tokens, reused [steps, B]; with true CFG an item's
        step counts as reused when both its calls reused)."""
        if lora is not None:
            tparams = merge(tparams, *lora)
        n_target = x.shape[1]
        dtype = self.model.dtype
        if cache is not None:
            return self._cached_loop(tparams, x, ref_tokens, img_ids, txt, txt_ids, y, guidance, timesteps, cfg, cache)

        def velocity(x_t, t):
            inp = sampling.edit_tokens(x_t, [] if ref_tokens is None else [ref_tokens]).astype(dtype)
            pos = self.model.apply({"params": tparams}, inp, img_ids, txt, txt_ids, t, y, guidance)[:, :n_target]
            if cfg is None:
                return pos
            neg_txt, neg_y, scale = cfg
            neg = self.model.apply({"params": tparams}, inp, img_ids, neg_txt, txt_ids, t, neg_y, guidance)
            return sampling.guide(pos, neg[:, :n_target], scale)  # neg + scale (pos - neg), float32

        return sampling.euler_sample(velocity, x, timesteps)

    def _cached_loop(self, tparams, x, ref_tokens, img_ids, txt, txt_ids, y, guidance, timesteps, cfg, cache):
        n_target, dtype = x.shape[1], self.model.dtype
        parts = step_cache.dit_parts(self.model, tparams, cache.first, TEACACHE_FLUX_DEV)
        n = timesteps.shape[0] - 1
        tokens = n_target + (0 if ref_tokens is None else ref_tokens.shape[1])
        state = step_cache.init_state(x.shape[0], tokens, parts.hidden_size, parts.dtype)
        state = (state, None if cfg is None else state)

        def velocity(x_t, t, st, i):
            inp = sampling.edit_tokens(x_t, [] if ref_tokens is None else [ref_tokens]).astype(dtype)
            pos, s_pos, r_pos = step_cache.cached_call(parts, (inp, img_ids, txt, txt_ids, t, y, guidance), st[0], i,
                                                       cache, n)  # fmt: skip
            if cfg is None:
                return pos[:, :n_target], (s_pos, None), r_pos
            neg_txt, neg_y, scale = cfg
            neg, s_neg, r_neg = step_cache.cached_call(parts, (inp, img_ids, neg_txt, txt_ids, t, neg_y, guidance),
                                                       st[1], i, cache, n)  # fmt: skip
            return sampling.guide(pos[:, :n_target], neg[:, :n_target], scale), (s_pos, s_neg), r_pos & r_neg

        return step_cache.euler_sample(velocity, x, timesteps, state)
