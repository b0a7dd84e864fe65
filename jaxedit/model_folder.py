"""jaxedit model folders: everything a pipeline needs, in one directory.

    FOLDER/jaxedit.json    {"format": "jaxedit-model", "version": 1, "preset": ..., "family": ...,
                            "config": {"transformer": {...}, "vae": {...}, "t5": {...}, "clip": {...}}}
    FOLDER/transformer/    Orbax checkpoint of each part's parameters
    FOLDER/vae/  FOLDER/t5/  FOLDER/clip/
    FOLDER/tokenizer/      CLIP tokenizer files    FOLDER/tokenizer_2/  T5 tokenizer files
    (jaxedit.json may also hold "pipeline": {...}, the model's pipeline defaults, e.g.
    {"auto_resize": false, "steps": 8, "guidance": 1.0} for a small model trained at its own sizes.)

Step1X-Edit folders (family "step1x-edit") hold transformer/ (DiT + connector) and vae/; their
description adds "connector": {...} to "config" and "qwen": {"path": ..., "config": {...}}, the
Qwen2.5-VL folder (recorded, not converted; relative paths are relative to FOLDER) and the
`jaxedit.step1x_text.QwenEmbedderConfig`.

The architecture is stored in full (not only a preset name), so folders of models that
have no registered preset (e.g. small models trained with jaxedit) load the same way.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxedit import configs

FORMAT, VERSION = "jaxedit-model", 1
PART_CONFIGS = {
    "transformer": configs.FluxConfig,
    "vae": configs.AutoEncoderConfig,
    "t5": configs.T5Config,
    "clip": configs.CLIPTextConfig,
}
TOKENIZERS = {"clip": "tokenizer", "t5": "tokenizer_2"}
# configs in the description: the parts (one folder each) and the connector (inside transformer/)
DESCRIBED_CONFIGS = PART_CONFIGS | {"connector": configs.ConnectorConfig}


def preset_to_dict(preset: configs.Preset, options: dict | None = None) -> dict:
    cfg = {p: dataclasses.asdict(getattr(preset, p)) for p in DESCRIBED_CONFIGS if getattr(preset, p) is not None}
    d = {"format": FORMAT, "version": VERSION, "preset": preset.name, "family": preset.family, "config": cfg}
    return d | ({"pipeline": dict(options)} if options else {})


def preset_from_dict(d: dict, where: str = "jaxedit.json") -> configs.Preset:
    if d.get("format") != FORMAT or d.get("version") != VERSION:
        raise ValueError(f"{where}: not a jaxedit model folder description (format {d.get('format')!r})")
    parts = {}
    for part, cls in DESCRIBED_CONFIGS.items():
        raw = d.get("config", {}).get(part)
        if raw is None:
            parts[part] = None
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - fields
        if unknown:
            raise ValueError(f"{where}: unknown {part} config field(s) {sorted(unknown)}")
        parts[part] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    if parts["transformer"] is None:
        raise ValueError(f"{where}: no transformer config")
    return configs.Preset(d.get("preset", "custom"), d.get("family", "flux-kontext"), **parts)


def write_description(
    folder: Path, preset: configs.Preset, options: dict | None = None, *, qwen_path=None, qwen_config=None
) -> None:
    """options: pipeline defaults stored with the model (e.g. {"auto_resize": False}).
    qwen_path / qwen_config: Step1X-Edit's Qwen2.5-VL folder and `QwenEmbedderConfig` (default config if None)."""
    d = preset_to_dict(preset, options)
    if qwen_path is not None or qwen_config is not None or preset.family == "step1x-edit":
        from jaxedit.step1x_text import QwenEmbedderConfig

        cfg = dataclasses.asdict(qwen_config or QwenEmbedderConfig())
        d["qwen"] = {"path": None if qwen_path is None else str(qwen_path), "config": cfg}
    (folder / "jaxedit.json").write_text(json.dumps(d, indent=1) + "\n")


def read_qwen(folder: str | Path):
    """(Qwen2.5-VL folder or None if none is recorded, QwenEmbedderConfig) of a Step1X-Edit model folder."""
    from jaxedit.step1x_text import QwenEmbedderConfig

    folder = Path(folder)
    q = json.loads((folder / "jaxedit.json").read_text()).get("qwen") or {}
    path = q.get("path")
    return (None if path is None else folder / Path(path)), QwenEmbedderConfig.from_dict(q.get("config", {}))


def read_options(folder: str | Path) -> dict:
    """The pipeline defaults stored with a model (empty if none)."""
    return dict(json.loads((Path(folder) / "jaxedit.json").read_text()).get("pipeline", {}))


def read_description(folder: str | Path) -> configs.Preset:
    folder = Path(folder)
    desc = folder / "jaxedit.json"
    if not desc.is_file():
        raise FileNotFoundError(f"{folder} is not a jaxedit model folder (no jaxedit.json)")
    return preset_from_dict(json.loads(desc.read_text()), str(desc))


def check_complete(folder: str | Path, preset: configs.Preset, *, skip: tuple[str, ...] = ()) -> None:
    """Raise FileNotFoundError naming every part of the folder that is missing (parts in `skip` may be)."""
    folder = Path(folder)
    missing = [
        p for p in PART_CONFIGS if p not in skip and getattr(preset, p) is not None and not (folder / p).is_dir()
    ]
    missing += [d for p, d in TOKENIZERS.items() if getattr(preset, p) is not None and not (folder / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {folder} is incomplete: missing {', '.join(missing)}")


def load_parts(folder: str | Path, preset: configs.Preset, *, dtypes: dict[str, Any] | None = None) -> dict[str, Any]:
    """{part: params} for every part the preset has, restored from the folder's Orbax checkpoints."""
    from jaxedit.checkpoint import load_params

    folder = Path(folder)
    check_complete(folder, preset)
    dtypes = dtypes or {}
    return {p: load_params(folder / p, dtype=dtypes.get(p)) for p in PART_CONFIGS if getattr(preset, p) is not None}
