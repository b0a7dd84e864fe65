"""What the converter does per model family, behind one interface.

Each family names its converter module (`jaxedit.families.Family.converter`, a string: the library does not
import the converter); that module's `CONVERTER` (a `FamilyConverter`) says what the shared code asks:
- `parts`: the family's own part specs (`Part`: the config type converted to, the key tables of a source,
  the target parameter shapes, the source layouts), e.g. its transformer; the parts every family may share
  (the FLUX VAE, T5, CLIP, Qwen2.5-VL) are `checkpoints_convert.SHARED_PARTS`;
- `part_config`: the config a part is converted with (Step1X-Edit: one file holds the DiT and the connector);
- the release on disk: which parts it holds (`release_parts`), further sources (`inputs`: Step1X-Edit's
  Qwen2.5-VL folder), the files a model folder gets besides the parts (`write_extra`);
- `published`: the published checkpoints it uses (manifests, `checkpoints_convert.published`).
Shared converter code never tests which family it has.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Part:
    """How one model part is converted: into parameters of a `config` type."""

    config: type  # the config type (`part_config`'s) this spec converts to
    rules: Callable  # (source, cfg, fmt) -> (rules, fmt); may strip a key prefix from the source
    targets: Callable  # cfg -> {param path: shape}
    formats: tuple[str, ...]


class FamilyConverter:
    """A family's converter. Subclasses set the attributes and override what differs."""

    parts: dict[str, Part] = {}  # the family's own part specs by part name (besides the shared ones)
    published: tuple = ()  # `checkpoints_convert.published.Published` entries of the family's presets
    # a diffusers release's folder of each part (model_index.json at the top)
    diffusers_dirs: dict[str, str] = {"transformer": "transformer", "vae": "vae", "clip": "text_encoder",
                                      "t5": "text_encoder_2"}  # fmt: skip

    def part_config(self, preset: Any, part: str) -> Any:
        """The config `load_part(part, ...)` takes for a preset (None: the preset has no such part)."""
        return getattr(preset, part, None)

    def release_parts(self, preset: Any, names: tuple[str, ...]) -> list[str]:
        """The parts converted from the release folder, in order, of every part name there is (`names`)."""
        return [p for p in names if self.part_config(preset, p) is not None and p not in self.input_parts]

    input_parts: tuple[str, ...] = ()  # parts that come from a further source (`inputs`), not the release

    def inputs(self, preset: Any, given: dict[str, Any]) -> dict[str, Any]:
        """The further sources of a release conversion, checked ({name: value}; `given`: the not-None ones the
        caller passed, e.g. {"qwen": path}); ValueError (one line) for one the family takes not."""
        if given:
            raise ValueError(f"preset {preset.name} takes no {', '.join(f'--{k}' for k in given)} folder")
        return {}

    def input_sources(self, inputs: dict[str, Any]) -> dict[str, tuple[Path, Any]]:
        """{part: (checkpoint path, config)} of the parts converted from the further sources."""
        return {}

    def release_config(self, preset: Any, part: str, paths: dict[str, Path]) -> Any:
        """The config a release's part is converted with (paths: where `locate` found the release's parts):
        the preset's (`part_config`), or what the release's own files say (a text encoder's config.json)."""
        return self.part_config(preset, part)

    def release_folders(self, preset: Any) -> dict[str, str]:
        """{name: folder in the release} of further folders the conversion reads (besides the parts' and the
        tokenizers'), e.g. a processor's files."""
        return {}

    def write_extra(self, new: Path, preset: Any, inputs: dict[str, Any], paths: dict[str, Path]) -> dict:
        """Write what a new model folder `new` gets besides the parts and tokenizers (paths: where `locate` found
        the release's parts and folders); the further top-level jaxedit.json entries."""
        return {}

    def notes(self, dst: Path, preset: Any, inputs: dict[str, Any]) -> list[str]:
        """What to tell the user after converting a release."""
        return []

    def add_qwen(self, folder: Path, qwen: Path, preset: Any, *, dtype: Any, log) -> Path:
        """Convert a Qwen2.5-VL folder into an existing model folder (`python -m checkpoints_convert add-qwen`)."""
        raise ValueError(f"{folder}: a {preset.family} model folder takes no separate Qwen2.5-VL folder")


def of(family: str | Any) -> FamilyConverter:
    """The converter of a family (a name, or anything with a `family`, e.g. a preset)."""
    from jaxedit import families

    return _converter(families.get(getattr(family, "family", family)).converter)


@functools.cache
def _converter(module: str) -> FamilyConverter:
    return importlib.import_module(module).CONVERTER


def all_converters() -> list[FamilyConverter]:
    """Each family's converter once, in `jaxedit.families.MODULES` order."""
    from jaxedit import families

    return list(dict.fromkeys(_converter(f.converter) for f in families.all_families()))
