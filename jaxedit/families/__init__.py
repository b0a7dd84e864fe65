"""Model families: what differs between FLUX.1 Kontext, Step1X-Edit and Qwen-Image-Edit, behind one interface.

    family = families.of(preset)            # or families.get("step1x-edit")
    module, args = family.transformer(preset, dtype=jnp.bfloat16)
    pipe = family.pipeline().load(folder)

A `Family` owns everything that differs between families: the names it answers to (a preset's and a model
folder's "family"), its parts (preset fields, one checkpoint sub-folder each) and their model classes, the
LoRA files its models read (the parts they change, their key spellings, each part's name table), its
pipeline and text conditioning, the training pieces that differ (batch keys, encoders, the loss's model call),
the planner's inputs and the command-line options that apply to it. Shared code asks a preset's family; it
never tests which family it has (tests/test_layout.py checks the modules that do so).

Layering: a family module imports only this package and `jaxedit.configs` when it is imported (the model
folder and model layers ask it about parts without pulling in pipelines or jax); its models, pipeline,
text conditioning and training pieces are imported inside the methods that use them. The registry names the
family modules (`MODULES`) and imports them on first use, so the layers below the pipelines can reach a
family without importing it. Adding a family: its module here (a `Family` subclass as `FAMILY`), one line in
`MODULES`, its config types in `jaxedit.configs`, its own modules in tests/test_layout.py's FAMILY_MODULES, and
its converter module (`checkpoints_convert.family.FamilyConverter`, named by `converter`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from jaxedit import configs

# one line per family: the module whose FAMILY is that family
MODULES = ("jaxedit.families.kontext", "jaxedit.families.step1x", "jaxedit.families.qwen_image")


class Family:
    """One model family. Subclasses set the attributes and implement the methods that raise here."""

    title: str = ""  # for messages: "FLUX.1 Kontext", "Step1X-Edit", "Qwen-Image-Edit"
    names: tuple[str, ...] = ()  # the "family" values of its presets and model folders
    presets: tuple[configs.Preset, ...] = ()  # its named models (`jaxedit.presets`)
    # model part (a `configs.Preset` field; a model folder's sub-folder) -> (jaxedit.models module, class);
    # in this order (random_model seeds each part by its position)
    parts: dict[str, tuple[str, str]] = {}
    # the preset fields a model folder's jaxedit.json describes ("config"), with their config types: the parts
    # and configs stored inside them (Step1X-Edit's connector)
    part_configs: dict[str, type] = {}
    # parts a LoRA file may change (none: LoRAs are refused); their tables: `lora_table`, file keys: `lora_keys`
    lora_parts: tuple[str, ...] = ()
    max_references: int | None = None  # reference images an item may have (None: any number)
    reference_index: float = 1.0  # the objective's first id coordinate of reference tokens (0: the target's)
    vae_methods: tuple[str, str] = ("encode", "decode")  # the VAE's methods: images <-> transformer latents
    cfg_passes: int = 1  # transformer passes per denoising step (classifier-free guidance doubles the batch)
    # the preset fields its transformer is built from besides `transformer` (Step1X-Edit: its connector)
    transformer_configs: tuple[str, ...] = ()
    # its converter module (`checkpoints_convert.family`; named, not imported: the converter imports the library)
    converter: str = ""

    def __repr__(self) -> str:
        return f"<family {self.title} {'/'.join(self.names)}>"

    # -- parts and models ------------------------------------------------------------------------------------

    def models_module(self, part: str):
        """The `jaxedit.models` module of `part` (KeyError naming the part if the family has none)."""
        if part not in self.parts:
            raise KeyError(f"{self.title} models have no part {part!r} (parts: {', '.join(self.parts)})")
        return importlib.import_module(f"jaxedit.models.{self.parts[part][0]}")

    def module(self, preset: configs.Preset, part: str, **kw: Any):
        """The Flax module of the preset's `part`; kw: module arguments (dtype, param_dtype, ...)."""
        return getattr(self.models_module(part), self.parts[part][1])(getattr(preset, part), **kw)

    def abstract_params(self, preset: configs.Preset, part: str, dtype: Any = None, *, boxed: bool = False) -> Any:
        """The parameter tree (ShapeDtypeStructs; boxed: with logical axis names) of the preset's `part`."""
        kw = {} if dtype is None else {"param_dtype": dtype}
        return self.models_module(part).abstract_params(getattr(preset, part), **kw, boxed=boxed)

    def example_inputs(self, preset: configs.Preset, part: str) -> tuple:
        """Arguments of the part's `init` (small zero arrays): the shared parts' here, the transformer's in
        the family."""
        import jax.numpy as jnp

        if part == "vae":
            return (jnp.zeros((1, 16, 16, 3)),)
        if part in ("t5", "clip"):
            return (jnp.zeros((1, 8), jnp.int32),)
        raise NotImplementedError(f"{self.title}: example inputs of {part!r}")

    def transformer(self, preset: configs.Preset, **kw: Any) -> tuple[Any, tuple]:
        """(the preset's transformer module, example inputs for its `init`). kw: module arguments (dtype,
        param_dtype, scan_layers, remat_policy, attention_impl)."""
        return self.module(preset, "transformer", **kw), self.example_inputs(preset, "transformer")

    # -- LoRA files ------------------------------------------------------------------------------------------

    def lora_table(self, preset: configs.Preset, part: str, naming: str) -> list | None:
        """The name table (`jaxedit.names` rules, for the preset's config of `part`) that places a LoRA on the
        part's torch Linears as LoRA files of the family's models name them in `naming`
        (`jaxedit.lora.formats.Term.naming`: "bfl", "diffusers", "hf"); None: no such names. The LoRA loader
        (`jaxedit.lora.targets`) and the converter read the same table."""
        return None

    def lora_keys(self) -> Any:
        """How LoRA files of the family's models spell their keys (a `jaxedit.lora.formats.KeyLayout`: prefixes
        -> part and naming, suffixes, bare module names); asked only of a family with `lora_parts`."""
        raise NotImplementedError(f"{self.title}: LoRA files")

    # the name table (a `lora_table` naming) whose torch modules the trainer's adapters are LoRAs on
    lora_naming: str = "diffusers"

    def lora_targets(self) -> dict:
        """The trainer's LoRA targets on the transformer (`jaxedit.train.lora`: name -> `Target`, the kernels
        under a stack of blocks), in their default order; empty: the family's models train no LoRAs."""
        return {}

    def present_parts(self, preset: configs.Preset) -> list[str]:
        """The family's parts this preset has (a config given)."""
        return [p for p in self.parts if getattr(preset, p) is not None]

    def description_extra(self, preset: configs.Preset) -> dict | None:
        """Further top-level jaxedit.json entries a new (random-weight) model folder gets."""
        return None

    # -- pipeline and command line ---------------------------------------------------------------------------

    def pipeline(self) -> type:
        """The family's editing pipeline class (`load`, `footprint`, `sample_inputs`, `denoise`)."""
        raise NotImplementedError

    def footprint(self, preset: configs.Preset, dtype: Any, quantize: str | None, text_on_cpu: bool = False):
        """What the pipeline's mesh "auto" places by (`jaxedit.parallel.placement.Footprint`)."""
        raise NotImplementedError

    def load_options(self, args: Any, preset: configs.Preset) -> dict:
        """The pipeline `load` arguments of the command line's model options (`jaxedit.cli.model_options`)
        that apply to this family; ValueError (one line) for a flag given that does not."""
        raise NotImplementedError

    def configure(self, pipe: Any, args: Any) -> None:
        """Settings of a loaded pipeline from the command line (ValueError: one line)."""

    # -- training --------------------------------------------------------------------------------------------

    def check_train(self, cfg: Any) -> None:
        """ValueError for a training setting (`jaxedit.train.config.TrainConfig`) the family cannot honour."""

    def check_objective(self, objective: Any) -> None:
        """ValueError for an objective setting (`jaxedit.train.objective.ObjectiveConfig`) the family's model
        cannot train with."""

    def conditioning(self) -> Any:
        """How the loss feeds the family's text conditioning to its transformer
        (`jaxedit.train.objective.Conditioning`: the batch keys of the prompt's two arrays, the model call)."""
        raise NotImplementedError

    def train_batch_keys(self, objective: Any) -> tuple[str, ...]:
        """The train step's batch arrays (further references reference_1, ... besides): the target's and the
        reference's latents and the conditioning's two arrays."""
        return ("target", "reference", *self.conditioning().keys)

    def train_args(self, preset: configs.Preset, args: tuple) -> tuple:
        """The transformer's arguments after (img, img_ids) in the loss, from those the conditioning's call
        passes (what the model takes)."""
        return args

    def train_inputs(self, preset: configs.Preset, img: Any, img_ids: Any, args: tuple) -> tuple:
        """The transformer's call arguments in the loss, from the image tokens, their positions (what the
        conditioning's `positions` made) and the arguments the conditioning's call passes after them."""
        return (img, img_ids, *self.train_args(preset, args))

    def train_encoder(self, cfg: Any, folder: Any, preset: configs.Preset, parts: dict, batches: Any, mesh: Any):
        """(encoder of host batches or None when they come from a cache, the empty prompt's (txt, second)
        for prompt dropout or None) of a training run."""
        raise NotImplementedError

    def sample_options(self, cfg: Any, encoder: Any) -> dict:
        """`load_pipeline` arguments of a training run's sample edits."""
        raise NotImplementedError

    def precompute(self, folder: Any, preset: configs.Preset, data: Any, out: Any, batch: int, mesh: str,
                   shard_size: int = 256):  # fmt: skip
        """Write the cache of a dataset's conditioning that training reads (`jaxedit.train.precompute`); its
        summary ({"ids": item ids, "seconds": ...}). Of a packed dataset (`jaxedit.data`): this process's share as
        record shards of `shard_size` examples, the family choosing the arrays (`jaxedit.data.encode.write`)."""
        raise NotImplementedError

    # -- planner ---------------------------------------------------------------------------------------------

    def text_tokens(self, preset: configs.Preset) -> int:
        """Text tokens of a prompt by default."""
        raise NotImplementedError

    def train_text(self, preset: configs.Preset, batch: int, tokens: int) -> dict[str, tuple[tuple, str]]:
        """{batch key: (shape, dtype name)} of the train step's text conditioning."""
        raise NotImplementedError

    def infer_text(self, preset: configs.Preset, batch: int, tokens: int, array) -> tuple:
        """The transformer's arguments after (img, img_ids), made by array(shape, dtype)."""
        raise NotImplementedError

    def sample_inputs(self, pipe, batch: int, h: int, w: int, steps: int, *, references: int, text_tokens: int,
                      quantize: str | None) -> tuple:  # fmt: skip
        """(mesh, arguments of `pipe.denoise`): the sampling loop's placement and program inputs."""
        raise NotImplementedError

    def lower_text(self, preset: configs.Preset, args: Any, mesh: Any, batch: int, array, replicated):
        """(the text conditioning's program lowered for `batch` items, its figures for the report); array /
        replicated: the planner's batch-sharded and replicated abstract arrays."""
        raise NotImplementedError


def configure_true_cfg(pipe: Any, args: Any) -> None:
    """A pipeline's true CFG from --true-cfg-scale / --negative-prompt (the other one: the model's), for the families
    whose pipelines have it (`set_true_cfg`); ValueError naming the flag."""
    if args.true_cfg_scale is None and args.negative_prompt is None:
        return
    scale = pipe.true_cfg_scale if args.true_cfg_scale is None else args.true_cfg_scale
    try:
        pipe.set_true_cfg(scale, pipe.negative_prompt if args.negative_prompt is None else args.negative_prompt)
    except ValueError as e:
        raise ValueError(f"--true-cfg-scale: {e}") from None


def scheduler_flag(kind: type, text: str, base: Any = None) -> Any:
    """`--scheduler`'s config of type `kind` (`jaxedit.configs.SchedulerConfig` or `FluxSchedulerConfig`: a named
    scheduler and/or KEY=VALUE items) over `base` (the pipeline's); ValueError (one line) naming the flag."""
    try:
        return kind.parse(text, base)
    except ValueError as e:
        raise ValueError(f"--scheduler: {e}") from None


def configure_scheduler(pipe: Any, args: Any) -> None:
    """A pipeline's schedule from --scheduler over the model's (`scheduler_type`), when given."""
    if getattr(args, "scheduler", None) is not None:
        pipe.scheduler = scheduler_flag(pipe.scheduler_type, args.scheduler, pipe.scheduler)


@functools.cache
def _registry() -> dict[str, Family]:
    out = {}
    for module in MODULES:
        family = importlib.import_module(module).FAMILY
        strays = [p.name for p in family.presets if p.family not in family.names]
        if strays:
            raise ValueError(f"{family!r} holds presets of other families: {', '.join(strays)}")
        for name in family.names:
            if name in out:
                raise ValueError(f"family name {name!r} is claimed by {out[name]!r} and {family!r}")
            out[name] = family
    return out


def names() -> tuple[str, ...]:
    """Every family name (a preset's and a model folder's "family" value)."""
    return tuple(_registry())


def all_families() -> list[Family]:
    """Each registered family once, in `MODULES` order."""
    return list(dict.fromkeys(_registry().values()))


def get(name: str) -> Family:
    """The family called `name`; KeyError listing the known names."""
    try:
        return _registry()[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(names())}") from None


def transformer_preset(transformer: Any, **more: Any) -> configs.Preset:
    """A preset of just a transformer, of the family whose transformer has that config type and is built from
    exactly the further configs given (`more`'s not-None values, e.g. Step1X-Edit's connector; none: FLUX.1
    Kontext), for code handed the configs rather than a preset (the train step's `Trainer`). ValueError when no
    family's transformer is."""
    more = {k: v for k, v in more.items() if v is not None}
    found = [f for f in all_families() if set(f.transformer_configs) == set(more)
             and isinstance(transformer, f.part_configs["transformer"])]  # fmt: skip
    if len(found) != 1:
        raise ValueError(f"no model family's transformer is built from {', '.join(['transformer', *more])}")
    return configs.Preset(f"{found[0].names[0]}-transformer", found[0].names[0], transformer, **more)


def of(preset: configs.Preset) -> Family:
    """The family of a preset (or of anything with a `preset`, e.g. an opened model folder)."""
    preset = getattr(preset, "preset", preset)
    return get(preset.family)
