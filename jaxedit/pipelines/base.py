"""What the editing pipelines of every family share.

`EditPipelineBase` holds the preset, the parameters of every part, the devices and the VAE
programs; it places every part on one mesh (`jaxedit.parallel.placement`: replicated, FSDP or tensor
parallel; `choose_mesh` resolves the mesh option and `auto`) and puts batches on it (the fewest data rows a
batch needs, padded to the batch axes). Module functions open a model folder, convert images, check sizes and
step counts, and turn on JAX's persistent compilation cache.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxedit import configs, model_folder, sampling
from jaxedit.parallel import placement
from jaxedit.parallel import sharding as sh
from jaxedit.pipelines.batch import NonFiniteError

MAX_SIDE = 4096  # pixels; larger requests are refused


def cache_dir() -> Path | None:
    """Where compiled programs are kept: $JAXEDIT_CACHE_DIR ("off" disables the cache), else
    $XDG_CACHE_HOME/jaxedit/xla, else ~/.cache/jaxedit/xla."""
    path = os.environ.get("JAXEDIT_CACHE_DIR")
    if path:
        return None if path.lower() == "off" else Path(path)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxedit" / "xla"


_CACHE_WARNED: set[str] = set()


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache at `path` (default `cache_dir()`): a second run of
    the same shapes then skips XLA compilation. Returns the folder (None: disabled). The cache is optional: a
    folder that cannot be made or written (a file, /proc, read-only) is warned about once, naming the variable
    it came from, and the run goes on without it."""
    given = path is not None
    path = Path(path) if given else cache_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe.{os.getpid()}"  # os.access would say yes to root on a read-only file system
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        source = "the path given" if given else ("$JAXEDIT_CACHE_DIR" if os.environ.get("JAXEDIT_CACHE_DIR")
                                                 else "$XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME")
                                                 else "$HOME")  # fmt: skip
        if str(path) not in _CACHE_WARNED:
            _CACHE_WARNED.add(str(path))
            print(f"warning: compilation cache {path} (from {source}) is not usable ({e.strerror or e}): running "
                  "without it (programs are compiled each run; JAXEDIT_CACHE_DIR=off silences this)",
                  file=sys.stderr)  # fmt: skip
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def to_images(images_BHWC: np.ndarray, convert) -> list:
    """[convert(image, index) of each item], each item's decoded values checked first: NonFiniteError (holding the
    others' images) if any item has a NaN or inf, which would otherwise become a black or noisy picture."""
    x = np.asarray(images_BHWC, np.float32)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    out = [convert(a, i) if ok else None for i, (a, ok) in enumerate(zip(x, finite))]
    if not finite.all():
        raise NonFiniteError(out, [int(i) for i in np.flatnonzero(~finite)])
    return out


def to_model_input(image: Image.Image) -> np.ndarray:
    """PIL RGB -> [H, W, 3] float32 in [-1, 1] (as diffusers' VaeImageProcessor)."""
    return np.asarray(image.convert("RGB"), np.float32) / 255.0 * 2.0 - 1.0


def check_side(name: str, v: int) -> None:
    """ValueError unless 16 <= v <= MAX_SIDE (v in pixels, after flooring to a multiple of 16)."""
    if not 16 <= v <= MAX_SIDE:
        raise ValueError(f"{name} {v} px is outside [16, {MAX_SIDE}] (after flooring to a multiple of 16)")


def check_steps(steps: Any, default: int) -> int:
    """The number of denoising steps: `default` when None, else a positive integer (0 is an error, not
    the default)."""
    if steps is None:
        return int(default)
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def open_folder(
    folder: str | Path | model_folder.ModelFolder, pipeline: type, dtype: Any = None
) -> tuple[model_folder.ModelFolder, Any]:
    """(the opened model folder, compute dtype) of a model folder (a path, opened here, or an opened
    `ModelFolder`) whose family's pipeline is `pipeline` (or a base of it). dtype: default the folder's option
    "dtype", else bfloat16."""
    from jaxedit import families

    opened = model_folder.ModelFolder.of(folder)
    family = families.of(opened)
    if not issubclass(pipeline, family.pipeline()):
        raise ValueError(f"{opened.path} holds a {family.title} model ({opened.family!r}), which "
                         f"{pipeline.__name__} does not run")  # fmt: skip
    return opened, jnp.dtype(dtype or opened.options.get("dtype", "bfloat16"))


def quantize_mode(folder: model_folder.ModelFolder, quantize: str | None) -> str | None:
    """The weight quantisation to load with: `quantize` (None: the folder's pipeline option "quantize", else
    whatever the folder stores; "none": not quantised, refused for a folder stored quantised)."""
    from jaxedit import quant

    stored = set(folder.quantized.values())
    try:
        mode = quant.check_mode(folder.options.get("quantize") if quantize is None else quantize)
    except ValueError as e:
        raise ValueError(f"{folder.path}: {e}") from None
    if quantize in ("none", "") and stored:
        raise ValueError(f"{folder.path} is stored quantised ({', '.join(sorted(stored))}): it cannot load "
                         "unquantised")  # fmt: skip
    if mode is None and stored:
        return None  # load as stored
    return mode


def quantized_parts(params: dict) -> dict[str, str]:
    """{part: mode} of the parts whose weights are quantised (`jaxedit.quant.mode_of`)."""
    from jaxedit import quant

    return {p: m for p, tree in params.items() if (m := quant.mode_of(tree))}


def choose_mesh(
    preset: configs.Preset,
    option,
    devices: list,
    footprint: placement.Footprint,
    *,
    quantize: str | None,
    memory: float | None = None,
    where: str = "",
) -> configs.MeshConfig:
    """The pipeline's mesh for the mesh option (`placement.parse`: None = replicated data parallel, "auto",
    or axis sizes) on `devices`. auto: the choice `jaxedit plan --mesh auto` recorded for this preset,
    quantisation and chips, else `placement.rule` with the footprint's weights (bytes of the parameters the
    devices hold) and the working set of one sample of its tokens; memory: bytes per chip (default: what the
    device reports; None on a CPU). where: what the option came from, for the error message."""
    n = len(devices)
    try:
        cfg = placement.parse(option)
        if cfg is not None and cfg != "auto":
            return placement.resolve(cfg, n)
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if where else str(e)) from None
    if cfg is None:
        return configs.MeshConfig(data=n, fsdp=1)
    recorded = placement.recorded(placement.key_for(preset, quantize, devices))
    if recorded is not None:
        return placement.resolve(recorded, n)
    memory = placement.chip_memory(devices[0]) if memory is None else memory
    f = footprint
    work = placement.working_set_bytes(preset.transformer.hidden_size, f.tokens, f.block_bytes)
    return placement.rule(n, f.weights, work, memory)


def folder_mesh(
    opened: model_folder.ModelFolder, mesh, devices: list, footprint: placement.Footprint, quantize: str | None
) -> configs.MeshConfig:
    """The mesh of a pipeline loaded from `opened`: `mesh` when given, else the folder's pipeline option "mesh",
    else "auto" (`choose_mesh`; an error names jaxedit.json when the option came from there)."""
    from_folder = mesh is None and "mesh" in opened.options
    where = f"{opened.path / 'jaxedit.json'}: pipeline.mesh" if from_folder else "mesh"
    option = opened.options.get("mesh", "auto") if mesh is None else mesh
    return choose_mesh(opened.preset, option, devices, footprint, quantize=quantize, where=where)


def block_bytes(preset: configs.Preset, dtype: Any, quantize: str | None) -> float:
    """Bytes of the transformer's largest block (its stacked blocks' bytes over their count) in `dtype`."""
    from jaxedit import quant

    tree = quant.cast(model_folder.expected_params(preset, "transformer", quantize), dtype)
    cfg = preset.transformer
    sizes = [placement.tree_bytes(tree[k]) / n for k, n in cfg.stacks if k in tree and n]
    return max(sizes, default=0.0)


def resident_bytes(preset: configs.Preset, parts: dict[str, tuple[Any, str | None]]) -> float:
    """Bytes of the parameters of `parts` ({part: (dtype or None: float32, quantisation mode)})."""
    from jaxedit import quant

    total = 0.0
    for part, (dtype, mode) in parts.items():
        tree = model_folder.expected_params(preset, part, mode)
        total += placement.tree_bytes(quant.cast(tree, dtype) if dtype is not None else tree)
    return total


def folder_cache(opened: model_folder.ModelFolder) -> Any:
    """The step cache a model folder's pipeline option "cache" names (a schedule file: inside the folder)."""
    from jaxedit import step_cache

    value, where = opened.options["cache"], f"{opened.path / 'jaxedit.json'}: pipeline.cache"
    kind, _, arg = value.partition(":")
    if kind == "schedule":
        path = opened.path / arg
        if Path(arg).is_absolute() or not path.resolve().is_relative_to(opened.path.resolve()):
            raise ValueError(f"{where}: schedule {arg!r} leads outside the model folder")
    try:
        return step_cache.parse(value, base=opened.path)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclasses.dataclass
class LoadPlan:
    """How `EditPipelineBase.load` loads a family's folder (its pipeline's `load_plan`)."""

    footprint: placement.Footprint  # what the mesh "auto" places by
    dtypes: dict[str, Any]  # {part: dtype} of the parts loaded in the compute dtype (the rest as stored)
    on_host: dict[str, Any] | None = None  # {part: CPU device} of parts kept in host memory
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the family's load arguments


@dataclasses.dataclass
class BatchPlan:
    steps: int
    mesh: jax.sharding.Mesh
    params: dict  # every part's parameters on `mesh`
    h: int  # latent cells
    w: int
    size: int  # the batch size it runs at: the items, padded to a multiple of the mesh's batch axes

    def put(self, a) -> jax.Array:
        """An array whose first axis is the batch, padded to `size` and split over the mesh's batch axes."""
        return EditPipelineBase.put_batch(self.mesh, placement.pad(a, self.size))


class EditPipelineBase:
    """Preset, parameters ({part: params}), devices, VAE programs and the placement on one mesh
    (`jaxedit.parallel.placement`).

    Subclasses set `self.model`, the transformer module whose parameters are `params["transformer"]`.
    mesh: a `MeshConfig` over `devices` (None: replicated data parallel over all of them)."""

    model: Any
    default_steps: int
    default_guidance: float
    folder: model_folder.ModelFolder | None = None  # the model folder it was loaded from (`load`)
    quantized: dict[str, str] = {}  # {part: "int8" / "fp8"} of the parts whose weights are quantised
    step_caching: bool = False  # whether `denoise_loop` takes a step cache (`cache=`, `jaxedit.step_cache`)
    scheduler_type: type = configs.FluxSchedulerConfig  # the schedule's config (`schedule`, --scheduler)
    scheduler: Any = configs.FluxSchedulerConfig()  # the schedule of later edits (`set_scheduler`)
    cache = None  # the step cache of later edits (`set_cache`; None: off)
    last_cache_skips: np.ndarray | None = None  # [steps, items]: which steps each item reused, the last cached edit

    def __init__(
        self, preset: configs.Preset, params: dict[str, Any], *, vae_dtype: Any, devices: list | None,
        mesh: configs.MeshConfig | str | None = None,
    ):  # fmt: skip
        self.preset = preset
        self.devices = list(devices or jax.local_devices())
        cfg = placement.parse(mesh)
        if cfg == "auto":
            raise ValueError("mesh 'auto' is resolved when a model folder is loaded (Pipeline.load(mesh='auto'))")
        cfg = placement.resolve(cfg or configs.MeshConfig(data=len(self.devices), fsdp=1), len(self.devices))
        self.mesh = sh.make_mesh(cfg, self.devices)
        self.params = self.place(params)
        self._row_meshes: dict[int, jax.sharding.Mesh] = {}  # `row_mesh`
        self._views: tuple = (None, None)  # ((rows, the parameters viewed), their views on those rows): `params_on`
        family = self.family
        self.vae = family.module(preset, "vae", dtype=vae_dtype, param_dtype=vae_dtype)
        encode, decode = family.vae_methods  # images <-> the latents the transformer sees
        self.encode_images = jax.jit(lambda p, x: self.vae.apply({"params": p}, x, method=encode))
        self.decode_latents = jax.jit(lambda p, z: self.vae.apply({"params": p}, z, method=decode))

    def part_shardings(self, part: str, params: Any = None, mesh: jax.sharding.Mesh | None = None) -> Any:
        """The NamedShardings of `part`'s parameters on the pipeline's mesh (or `mesh`), quantised as `params` is
        (or, a string, with that mode)."""
        from jaxedit import quant

        mode = params if isinstance(params, str | None) else quant.mode_of(params)
        return model_folder.part_shardings(self.preset, part, mesh or self.mesh, mode)

    def abstract_part(self, part: str, dtype: Any, quantize: str | None, mesh: jax.sharding.Mesh) -> Any:
        """`part`'s parameters as ShapeDtypeStructs in `dtype` (quantised kernels keep theirs) placed on `mesh` as
        the pipeline places them: what the planner compiles with."""
        from jaxedit import quant
        from jaxedit.checkpoint import as_stored_on

        tree = quant.cast(model_folder.expected_params(self.preset, part, quantize), dtype)
        return as_stored_on(tree, self.part_shardings(part, quantize, mesh))

    def place(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every part's parameters on the mesh by the rule table (already there: unchanged); other entries
        (run-time LoRA factors) replicated."""
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        out, parts = {}, self.family.parts
        for part, tree in params.items():
            if part in parts and getattr(self.preset, part, None) is not None:
                out[part] = jax.device_put(tree, self.part_shardings(part, tree))
            else:
                out[part] = jax.device_put(tree, rep)
        return out

    @property
    def mesh_text(self) -> str:
        return placement.text(placement.config_of(self.mesh))

    @staticmethod
    def put_batch(mesh: jax.sharding.Mesh, a) -> jax.Array:
        """An array whose first axis is the batch, split over the mesh's batch axes."""
        return jax.device_put(a, sh.batch_sharding(mesh, np.ndim(a)))

    def batch_plan(self, prepared: list, steps: int | None) -> BatchPlan:
        """Where one batch of prepared items (sharing a bucket) runs: its step count, the mesh (the first rows of
        the pipeline's `data` axis that the batch needs: `placement.rows_for`), the parameters there, latent size
        and the padded batch size."""
        f = self.preset.vae.downsample
        h, w = prepared[0].height // f, prepared[0].width // f
        mesh, size = self.batch_mesh(len(prepared))
        return BatchPlan(check_steps(steps, self.default_steps), mesh, self.params_on(mesh), h, w, size)

    def row_mesh(self, rows: int) -> jax.sharding.Mesh:
        """The mesh of the first `rows` rows of the pipeline's `data` axis (all of them: the pipeline's mesh)."""
        if rows == self.mesh.shape["data"]:
            return self.mesh
        if rows not in self._row_meshes:
            self._row_meshes[rows] = jax.sharding.Mesh(self.mesh.devices[:rows], self.mesh.axis_names)
        return self._row_meshes[rows]

    def batch_mesh(self, batch: int) -> tuple[jax.sharding.Mesh, int]:
        """(the mesh a batch of `batch` items runs on: the first `placement.rows_for` rows of the pipeline's
        `data` axis, the batch size it runs at: padded to a multiple of that mesh's batch axes)."""
        mesh = self.row_mesh(placement.rows_for(batch, self.mesh))
        return mesh, placement.padded(batch, mesh)

    def replicated(self, mesh: jax.sharding.Mesh, a) -> jax.Array:
        """`a` on every device of `mesh`."""
        return jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def params_on(self, mesh: jax.sharding.Mesh) -> dict:
        """The parameters on `mesh`, a `row_mesh` of the pipeline's: views of the shards those devices already hold
        (each data row holds all the weights), nothing copied; the last views are kept."""
        if mesh is self.mesh:
            return self.params
        if self._views[0] is None or self._views[0][0] is not mesh or self._views[0][1] is not self.params:
            self._views = ((mesh, self.params), placement.restrict(self.params, mesh))
        return self._views[1]

    # -- the template every family's pipeline runs: `load`, `__call__`, `generate` (text -> references -> token
    # layout -> denoise -> decode); the family's pipeline fills in the hooks below each

    @classmethod
    def load(
        cls,
        folder: str | Path | model_folder.ModelFolder,
        *,
        dtype: Any = None,
        compile_cache: bool = True,
        quantize: str | None = None,
        mesh: configs.MeshConfig | str | None = None,
        devices: list | None = None,
        **kw,
    ):
        """Load a jaxedit model folder (a path or an opened `jaxedit.model_folder.ModelFolder`) of the pipeline's
        family. dtype (transformer and text encoders): default the folder's pipeline option "dtype", else
        bfloat16. quantize: "int8" / "fp8" weights (`jaxedit.quant`; default the folder's pipeline option
        "quantize"), quantised as they load unless the folder stores them so. mesh: where the pipeline runs on
        `devices` (default: the local ones; `jaxedit.parallel.placement`): None = the folder's pipeline option
        "mesh", else "auto"; or axis sizes ("data=2,fsdp=2"); every part is restored straight into its sharding
        on it. kw: the family's load arguments (`load_plan`) and the pipeline's (its constructor's)."""
        opened, dtype = open_folder(folder, cls, dtype)
        quantize = quantize_mode(opened, quantize)
        if opened.options.get("scheduler") is not None:  # checked as the family's schedule before any weight loads
            try:
                cls.scheduler_type.from_option(opened.options["scheduler"])
            except ValueError as e:
                raise ValueError(f"{opened.path / 'jaxedit.json'}: pipeline.scheduler: {e}") from None
        devices = list(devices or jax.local_devices())
        plan = cls.load_plan(opened, dtype, quantize, kw)  # takes the family's arguments out of kw
        mesh = folder_mesh(opened, mesh, devices, plan.footprint, quantize)
        on_mesh = sh.make_mesh(mesh, devices)
        if compile_cache:
            enable_compilation_cache()
        params = model_folder.load_parts(opened, dtypes=plan.dtypes, quantize=quantize, devices=plan.on_host,
                                         mesh=on_mesh)  # fmt: skip
        text = cls.load_text(opened, plan, params, on_mesh)
        pipe = cls(opened.preset, params, text, dtype=dtype, mesh=mesh, devices=devices,
                   **(cls.folder_defaults(opened.options) | kw))  # fmt: skip
        pipe.folder, pipe.quantized = opened, quantized_parts(params)
        pipe.default_steps = int(opened.options.get("steps", pipe.default_steps))
        pipe.default_guidance = float(opened.options.get("guidance", pipe.default_guidance))
        pipe.loaded(opened, plan)
        if opened.options.get("cache") is not None:
            pipe.set_cache(folder_cache(opened))
        return pipe

    @classmethod
    def load_plan(cls, opened: model_folder.ModelFolder, dtype: Any, quantize: str | None, kw: dict) -> LoadPlan:
        """Hook: how `load` loads the folder: the family's load arguments popped from `kw`, the folder checked
        (ValueError naming jaxedit.json), what its mesh "auto" places by."""
        raise NotImplementedError

    @classmethod
    def load_text(cls, opened: model_folder.ModelFolder, plan: LoadPlan, params: dict, mesh: jax.sharding.Mesh):
        """Hook: the pipeline's text encoder (its parts' parameters popped from `params`), placed on `mesh`."""
        raise NotImplementedError

    @classmethod
    def folder_defaults(cls, options: dict) -> dict:
        """Hook: constructor arguments from the folder's pipeline options (what `load`'s kw leaves unset)."""
        return {}

    def loaded(self, opened: model_folder.ModelFolder, plan: LoadPlan) -> None:
        """Hook: what a loaded pipeline takes from its folder and load arguments after construction."""

    def __call__(
        self,
        images: list | None,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int | None = None,
        guidance: float | list[float] | None = None,
        width: int | None = None,
        height: int | None = None,
        latents: np.ndarray | None = None,
        output: str = "pil",
        **options,
    ):
        """Edit `images` (per item what the family's `prepare` takes: an image, a list of reference images, or
        None: text-to-image; all None: `images` None) with `prompts`; one seed per item. Items of one call share
        their sizes. steps and guidance default to the pipeline's (the model folder's options); options: the
        family's (`conditioning`)."""
        images = images if images is not None else [None] * len(prompts)
        prepared, steps, g = self.prepare_call(images, prompts, width, height, steps, guidance)
        return self.generate(prepared, prompts, seeds, guidance=g, steps=steps, latents=latents, output=output,
                             **options)  # fmt: skip

    def edit(self, prepared: list, prompts: list[str], seeds: list[int], guidance: list[float], steps: int) -> list:
        """One batch of prepared items sharing a bucket -> images (the protocol of `jaxedit.pipelines.batch`)."""
        return self.generate(prepared, prompts, seeds, guidance=guidance, steps=steps)

    def generate(self, prepared, prompts, seeds, *, guidance, steps, latents=None, output="pil", **options):
        """One batch of items sharing a bucket -> PIL images (or the final packed latents, output="latents"):
        the prompts' conditioning (`conditioning`), each reference encoded and packed alone, the token layout
        [target | references] and its ids (`image_ids`), the schedule (`schedule`), the jitted denoising loop
        (`denoise_args`), the decoded images (`output_images`). options: the family's (`conditioning`)."""
        b = self.check_batch(prepared, prompts, seeds, guidance)
        cache = self.cache if "cache" not in options else self.check_cache(options.pop("cache"))
        text = self.conditioning(prepared, list(prompts), **options)
        bp = self.batch_plan(prepared, steps)
        if cache is not None:
            cache.check_steps(bp.steps)
        mesh, params, h, w = bp.mesh, bp.params, bp.h, bp.w
        with sh.activate(mesh):
            refs, grids = [], []
            for i in range(len(prepared[0].references)):  # each reference encoded and packed alone
                ref_lat = self.encode_images(params["vae"], bp.put(np.stack([p.references[i] for p in prepared])))
                refs.append(sampling.pack(ref_lat))
                grids.append((ref_lat.shape[1] // 2, ref_lat.shape[2] // 2))
            ids = self.image_ids(h // 2, w // 2, grids)
            refs = self.put_batch(mesh, jnp.concatenate(refs, axis=1)) if refs else None
            if latents is None:
                noise = sampling.noise_for_seeds(jnp.asarray(seeds), (h, w, self.preset.vae.z_channels))
                latents = sampling.pack(noise)
            x = bp.put(np.asarray(latents, np.float32))
            img_ids = None if ids is None else bp.put(np.broadcast_to(ids, (b, *ids.shape)))
            timesteps = self.replicated(mesh, self.schedule(bp.steps, (h // 2) * (w // 2)))
            guidance = bp.put(np.asarray(guidance, np.float32))
            x = self.denoiser(cache)(*self.denoise_args(bp, text, x, refs, img_ids, guidance, timesteps))
            if cache is not None:
                x, reused = x
                self.last_cache_skips = np.asarray(reused)[:, :b]
            if output == "latents":
                return np.asarray(x)[:b]
            images = self.decode_latents(params["vae"], sampling.unpack(x, h, w))
        return self.output_images(np.asarray(images)[:b], prepared)

    def check_cache(self, cache) -> Any:
        """A step cache option (`jaxedit.step_cache.parse`: None or "off", "fbc:0.08", "tea:0.4", "schedule:FILE", a
        CacheSpec) -> CacheSpec or None; ValueError if the pipeline's loop takes none."""
        from jaxedit import step_cache

        spec = step_cache.parse(cache)
        if spec is not None and not self.step_caching:
            raise ValueError(f"{type(self).__name__} has no step cache yet (cache {cache!r})")
        return spec

    def set_scheduler(self, scheduler) -> None:
        """The schedule of later edits: a config of `scheduler_type`, an object of its fields, the text of
        `--scheduler` (a named scheduler and/or KEY=VALUE items) or None (the default). ValueError: one line."""
        kind = self.scheduler_type
        self.scheduler = scheduler if isinstance(scheduler, kind) else kind() if scheduler is None else (
            kind.from_option(scheduler))  # fmt: skip

    def set_cache(self, cache) -> None:
        """The step cache of later edits (see `check_cache`; None / "off": none); a call's `cache=` overrides it."""
        self.cache = self.check_cache(cache)

    def denoiser(self, cache) -> Any:
        """The jitted loop: `self.denoise`, with a step cache passed as its keyword `cache` (a pytree: the threshold
        is a run-time argument, so one program serves every threshold of a signal; a schedule compiles its own)."""
        if cache is None:
            return self.denoise
        return functools.partial(self.denoise, cache=cache)

    def image_ids(self, h2: int, w2: int, grids: list[tuple[int, int]]) -> np.ndarray | None:
        """Hook: the ids [tokens, 3] of [target | references] (`jaxedit.sampling.edit_ids`; None: the model takes
        no ids)."""
        return sampling.edit_ids(h2, w2, grids, self.reference_ids, self.family.reference_index)

    def schedule(self, steps: int, image_seq_len: int) -> np.ndarray:
        """Hook: the denoising loop's times for `steps` steps of a target of `image_seq_len` tokens (FLUX's
        shifted schedule)."""
        return sampling.flux_schedule(steps, image_seq_len, self.scheduler)

    def conditioning(self, prepared: list, prompts: list[str], **options) -> Any:
        """Hook: the prompts' text conditioning on the host (with anything else `denoise_args` needs), options
        checked (ValueError: one line)."""
        raise NotImplementedError

    def denoise_args(self, bp: BatchPlan, text: Any, x, refs, img_ids, guidance, timesteps) -> tuple:
        """Hook: the arguments of `self.denoise` (the jitted loop) from the batch's placed arrays: x the packed
        target tokens, refs the packed references (or None), img_ids their ids, guidance per item, timesteps."""
        raise NotImplementedError

    def output_images(self, images_BHWC: np.ndarray, prepared: list) -> list[Image.Image]:
        """Hook: the decoded images [-1, 1] of the items as PIL images."""
        raise NotImplementedError

    @property
    def family(self):
        """The pipeline's model family (`jaxedit.families`)."""
        from jaxedit import families

        return families.of(self.preset)

    reference_ids: str = "community"  # how several references take their ids (`jaxedit.sampling.REFERENCE_IDS`)

    # -- shared pieces

    def prepare_call(
        self, images: list, prompts: list[str], width: int | None, height: int | None, steps: int | None, guidance
    ) -> tuple[list, int, list[float]]:
        """(prepared items, step count, one guidance value per item) of a `__call__`: steps and guidance default to
        the pipeline's, every item is prepared (`prepare`) and must share the first one's bucket."""
        steps = check_steps(steps, self.default_steps)
        guidance = self.default_guidance if guidance is None else guidance
        prepared = [self.prepare(im, width, height) for im in images]
        if len({p.bucket for p in prepared}) != 1:
            raise ValueError("items of one call must share their sizes; use jaxedit.pipelines.batch for mixed sizes")
        return prepared, steps, [guidance] * len(prompts) if np.isscalar(guidance) else list(guidance)

    @staticmethod
    def check_batch(prepared: list, prompts: list[str], seeds: list[int], guidance: list[float]) -> int:
        """The batch size of a `generate` call: ValueError unless every list has one entry per prompt."""
        b = len(prompts)
        if not (len(prepared) == len(seeds) == len(guidance) == b):
            raise ValueError(f"{len(prepared)} items, {b} prompts, {len(seeds)} seeds, {len(guidance)} guidance values")
        return b

    def set_transformer(self, params) -> None:
        """Use other transformer parameters (e.g. the current ones of a training run)."""
        if self.quantized.get("transformer"):
            raise ValueError("this pipeline's transformer is quantised: load it unquantised to set its weights")
        dtype = self.model.param_dtype
        params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
        self.params = self.params | {"transformer": jax.device_put(params, self.part_shardings("transformer"))}
