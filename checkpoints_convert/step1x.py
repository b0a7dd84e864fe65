"""The Step1X-Edit family's converter: its transformer file (`step1x-edit-i1258.safetensors`: the BFL DiT plus the
Qwen2 connector under `connector.`, read with the library's key table `jaxedit.names.step1x`), its release
(`Step1XConverter`: the DiT file, its VAE, its Qwen2.5-VL folder) and `qwen_embedder`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

from checkpoints_convert.family import FamilyConverter, Part
from checkpoints_convert.mapping import ConversionError
from checkpoints_convert.published import Published
from checkpoints_convert.qwen import QWEN_PROCESSOR_NEEDED, copy_qwen_processor
from jaxedit.configs import ConnectorConfig, FluxConfig, Preset
from jaxedit.names import Rule
from jaxedit.names import step1x as names
from jaxedit.names.step1x import connector_rules

__all__ = ["CONVERTER", "FORMAT", "Step1XSpec", "connector_rules", "is_step1x", "qwen_embedder", "step1x_rules"]

FORMAT = "step1x"


class Step1XSpec(NamedTuple):
    """What the transformer converter needs for a Step1X-Edit file: the DiT and connector configs."""

    dit: FluxConfig
    connector: ConnectorConfig

    @classmethod
    def of(cls, preset: Preset) -> Step1XSpec:
        if preset.connector is None:
            raise ValueError(f"preset {preset.name} has no connector (not a Step1X-Edit preset)")
        return cls(preset.transformer, preset.connector)


def is_step1x(keys) -> bool:
    """True for a Step1X-Edit transformer file (it carries the connector's tensors)."""
    return any(k.startswith("connector.") for k in keys)


def step1x_rules(spec: Step1XSpec) -> list[Rule]:
    """The whole Step1X-Edit file: BFL DiT names + `connector.*` (the library's table)."""
    if spec.dit.guidance_embed:
        raise ValueError("Step1X-Edit has no guidance_in: its DiT config needs guidance_embed=False")
    return names.step1x_rules(spec.dit, spec.connector)


# ---------------------------------------------------------------------------------------
# The family's converter: its transformer file, its Qwen2.5-VL folder, its published checkpoints


def transformer_rules(source, cfg: Step1XSpec, fmt: str | None):
    """(rules, layout) of Step1X-Edit's DiT + connector file; a BFL wrapper prefix is dropped from its keys."""
    from checkpoints_convert.flux import strip_bfl_prefix

    prefix = strip_bfl_prefix(source.shapes)
    if prefix:
        source.strip(prefix)
    if fmt not in (None, FORMAT):
        raise ConversionError(f"a Step1X-Edit transformer is read in layout {FORMAT!r}, not {fmt!r}")
    return step1x_rules(cfg), FORMAT


def transformer_targets(cfg: Step1XSpec) -> dict[str, tuple[int, ...]]:
    from checkpoints_convert import shapes_of
    from jaxedit.models import step1x

    return shapes_of(step1x.abstract_params(cfg.dit, cfg.connector))


class Step1XConverter(FamilyConverter):
    """A release: `step1x-edit-i1258.safetensors` (DiT + connector) and `vae.safetensors` at the top; its
    Qwen2.5-VL-7B-Instruct folder (`qwen`, a transformers folder: config.json, safetensors, tokenizer,
    preprocessor_config.json) converted into `qwen/` (weights) and `qwen_processor/` (tokenizer, image processor
    and chat template files), its architecture recorded in jaxedit.json."""

    parts = {"transformer": Part(Step1XSpec, transformer_rules, transformer_targets, (FORMAT,))}
    input_parts = ("qwen",)
    published = (
        Published("step1x-edit", "transformer", FORMAT, ("step1x-edit",)),
        Published("bfl-ae", "vae", "bfl", ("step1x-edit",)),
        Published("step1x-ae", "vae", "bfl", ("step1x-edit",)),
        Published("hf-qwen2.5-vl-7b", "qwen", "transformers", ("step1x-edit",)),
    )

    def part_config(self, preset: Preset, part: str):
        if part == "transformer":
            return Step1XSpec.of(preset)
        return super().part_config(preset, part)

    def inputs(self, preset: Preset, given: dict) -> dict:
        qwen = given.pop("qwen", None)
        super().inputs(preset, given)  # anything else: refused
        if qwen is None:
            return {}
        qwen = Path(qwen).resolve()
        return {"qwen": qwen, "qwen_cfg": check_qwen(qwen, preset)}

    def input_sources(self, inputs: dict) -> dict:
        return {"qwen": (inputs["qwen"], inputs["qwen_cfg"])} if inputs else {}

    def write_extra(self, new: Path, preset: Preset, inputs: dict, paths: dict) -> dict:
        from jaxedit.step1x.text import QWEN_PROCESSOR, QwenEmbedderConfig, qwen_entry

        if inputs:
            copy_qwen_processor(inputs["qwen"], new / QWEN_PROCESSOR)
        return qwen_entry(None, QwenEmbedderConfig(preset.connector.in_channels), inputs.get("qwen_cfg"))

    def notes(self, dst: Path, preset: Preset, inputs: dict) -> list[str]:
        if inputs:
            return []
        return [f"note: no Qwen2.5-VL converted; add one: python -m checkpoints_convert add-qwen {dst} QWEN_FOLDER"]

    def add_qwen(self, folder: Path, qwen: Path, preset: Preset, *, dtype: Any, log) -> Path:
        """Convert a transformers Qwen2.5-VL folder into an existing Step1X-Edit model folder (qwen/ weights,
        qwen_processor/ files, the architecture in jaxedit.json), replacing any Qwen it held: everything is
        checked on headers first, each part is written beside and renamed into place."""
        from checkpoints_convert import open_part
        from checkpoints_convert.mapping import convert, unflatten
        from jaxedit.model_folder import ModelFolder, write_json, write_part
        from jaxedit.step1x.text import QWEN_PROCESSOR, QwenEmbedderConfig, qwen_entry, qwen_section

        qwen = Path(qwen).resolve()
        opened = ModelFolder.open(folder)
        qwen_cfg = check_qwen(qwen, preset)
        source, the_plan = open_part("qwen", qwen, qwen_cfg)  # raises before anything is written
        t0 = time.perf_counter()
        write_part(folder, "qwen", unflatten(convert(the_plan, source.read, dtype=dtype, source_dtype=source.dtype)))
        copy_qwen_processor(qwen, folder / QWEN_PROCESSOR)
        config = qwen_section(opened).config if opened.qwen.get("config") else None
        config = config or QwenEmbedderConfig(preset.connector.in_channels)
        write_json(folder / "jaxedit.json", opened.description | qwen_entry(None, config, qwen_cfg))
        log(f"  qwen: {source.describe()} -> {folder / 'qwen'} ({time.perf_counter() - t0:.1f}s)")
        return folder


CONVERTER = Step1XConverter()


def check_qwen(qwen: Path, preset: Preset):
    """The `QwenVLConfig` of a transformers Qwen2.5-VL folder, checked against a Step1X-Edit preset (width =
    the connector's in_channels) and for its tokenizer / image processor files; nothing is read but those."""
    from checkpoints_convert.qwen import read_config

    if preset.connector is None:
        raise ConversionError(f"preset {preset.name} takes no Qwen2.5-VL folder (not Step1X-Edit)")
    qwen_cfg = read_config(qwen, preset.connector.in_channels, "the connector's in_channels")
    missing = [f for f in QWEN_PROCESSOR_NEEDED if not (qwen / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{qwen}: missing {', '.join(missing)} (Qwen2.5-VL tokenizer / image processor)")
    return qwen_cfg


def qwen_embedder(path: str | Path, config=None, *, dtype: Any = "bfloat16", **kw):
    """A `jaxedit.step1x.text.Step1XQwenEmbedder` straight from a transformers Qwen2.5-VL folder (config.json,
    safetensors, tokenizer, preprocessor_config.json), its weights converted as they are read (no torch).
    config: the `QwenEmbedderConfig` (default: the released 7B setup); kw: Step1XQwenEmbedder arguments."""
    import jax.numpy as jnp

    from checkpoints_convert import load_part
    from jaxedit.configs import QwenVLConfig
    from jaxedit.step1x.text import QwenEmbedderConfig, Step1XQwenEmbedder, check_hidden

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"Qwen2.5-VL folder not found: {path} (no config.json)")
    config = config or QwenEmbedderConfig()
    qwen_cfg = QwenVLConfig.from_hf(json.loads((path / "config.json").read_text()))
    check_hidden(qwen_cfg, config, path)
    params = load_part("qwen", path, qwen_cfg, dtype=jnp.dtype(dtype))
    processor = Step1XQwenEmbedder.load_processor(path, config)
    return Step1XQwenEmbedder(params, qwen_cfg, *processor, config, dtype=dtype, name=path.resolve(), **kw)
