"""jaxedit model folders: everything a pipeline needs, in one directory.

    FOLDER/jaxedit.json    {"format": "jaxedit-model", "version": 1, "preset": ..., "family": ...,
                            "config": {"transformer": {...}, "vae": {...}, "t5": {...}, "clip": {...}}}
    FOLDER/transformer/    Orbax checkpoint of each part's parameters
    FOLDER/vae/  FOLDER/t5/  FOLDER/clip/
    FOLDER/tokenizer/      CLIP tokenizer files    FOLDER/tokenizer_2/  T5 tokenizer files
    (jaxedit.json may also hold "pipeline": {...}, the model's pipeline defaults, e.g.
    {"auto_resize": false, "steps": 8, "guidance": 1.0} for a small model trained at its own sizes.)

Step1X-Edit folders (family "step1x-edit") hold transformer/ (DiT + connector), vae/, qwen/ (the
converted Qwen2.5-VL) and qwen_processor/ (its tokenizer, image processor and chat template files);
their description adds "connector": {...} to "config" and "qwen": {"config": {...}, "model": {...}},
the `jaxedit.step1x.text.QwenEmbedderConfig` and the Qwen2.5-VL architecture (`configs.QwenVLConfig`),
written and read by `jaxedit.step1x.text` (older folders recorded a transformers folder as "path"
instead: `python -m checkpoints_convert add-qwen` converts it in).

The architecture is stored in full (not only a preset name), so folders of models that
have no registered preset (e.g. small models trained with jaxedit) load the same way.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from jaxedit import configs

FORMAT, VERSION = "jaxedit-model", 1
FAMILIES = ("flux-kontext", "flux", "step1x-edit")
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
    if d.get("family") not in FAMILIES:
        raise ValueError(f"{where}: field 'family' is {d.get('family')!r}; expected one of {', '.join(FAMILIES)}")
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
    return configs.Preset(d.get("preset", "custom"), d["family"], **parts)


def write_description(folder: Path, preset: configs.Preset, options: dict | None = None, extra: dict | None = None):
    """Write FOLDER/jaxedit.json (atomically). options: pipeline defaults stored with the model (e.g.
    {"auto_resize": False}); extra: further top-level entries (Step1X-Edit: "qwen")."""
    write_json(Path(folder) / "jaxedit.json", preset_to_dict(preset, options) | (extra or {}))


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON beside `path`, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def read_json(folder: str | Path) -> dict:
    """FOLDER/jaxedit.json as a dict (FileNotFoundError naming the folder if it has none)."""
    desc = Path(folder) / "jaxedit.json"
    if not desc.is_file():
        raise FileNotFoundError(f"{folder} is not a jaxedit model folder (no jaxedit.json)")
    try:
        return json.loads(desc.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{desc}: not valid JSON ({e})") from None


def read_options(folder: str | Path) -> dict:
    """The pipeline defaults stored with a model (empty if none)."""
    return dict(read_json(folder).get("pipeline", {}))


def read_description(folder: str | Path) -> configs.Preset:
    """The preset (architecture of every part) a model folder describes."""
    return preset_from_dict(read_json(folder), str(Path(folder) / "jaxedit.json"))


def write_part(folder: str | Path, part: str, params: Any) -> Path:
    """Replace FOLDER/<part> with `params` (an Orbax checkpoint) without ever leaving the folder without a
    complete copy: written beside as .<part>.new, then the old part is moved aside and the new one renamed
    into place (`recover_parts` finishes a swap cut between those two renames). Collective on several
    processes (every process writes its shards; the main one renames)."""
    import jax

    from jaxedit.checkpoint import save_params
    from jaxedit.parallel.distributed import sync

    folder = Path(folder)
    dst, new, old = folder / part, folder / f".{part}.new", folder / f".{part}.old"
    lead = jax.process_index() == 0
    if lead:
        recover_parts(folder)  # a swap cut earlier is finished before its leftovers are cleared
        for leftover in (new, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    sync(f"write_part {part}: clean")
    save_params(new, params)
    if lead:
        if dst.exists():
            dst.rename(old)
        new.rename(dst)
        if old.exists():
            shutil.rmtree(old)
    sync(f"write_part {part}: swapped")
    return dst


def recover_parts(folder: str | Path) -> None:
    """Finish a `write_part` cut between its two renames: a missing part whose complete new copy
    (.<part>.new) or old copy (.<part>.old) is beside it is put back in place."""
    folder = Path(folder)
    for part in PART_CONFIGS:
        dst = folder / part
        if dst.exists():
            continue
        new, old = folder / f".{part}.new", folder / f".{part}.old"
        for beside, other in ((new, old), (old, new)):
            if (beside / "_CHECKPOINT_METADATA").is_file():
                beside.rename(dst)
                shutil.rmtree(other, ignore_errors=True)
                break


def digest(folder: str | Path, parts: tuple[str, ...]) -> dict[str, str]:
    """{part: sha256 hex} of the named parts (sub-folders: every file's relative path and bytes; a model
    part's digest also covers its config in jaxedit.json): what a cache derived from them depends on."""
    import hashlib

    folder = Path(folder)
    config = read_json(folder).get("config", {})
    out = {}
    for part in parts:
        h = hashlib.sha256(json.dumps(config.get(part), sort_keys=True).encode())
        root = folder / part
        for f in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
            h.update(str(f.relative_to(root)).encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        out[part] = h.hexdigest()
    return out


def fingerprint(folder: str | Path) -> str:
    """A cheap identity of a model folder (sha256 hex), no weights read: its resolved path, jaxedit.json's
    bytes and every file's relative path, size and modification time, so it changes when a part is rewritten."""
    import hashlib

    folder = Path(folder).resolve()
    h = hashlib.sha256(str(folder).encode() + b"\0")
    for f in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []:
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    if (folder / "jaxedit.json").is_file():
        h.update((folder / "jaxedit.json").read_bytes())
    return h.hexdigest()


def check_complete(folder: str | Path, preset: configs.Preset, *, skip: tuple[str, ...] = ()) -> None:
    """Raise FileNotFoundError naming every part of the folder that is missing (parts in `skip` may be)."""
    folder = Path(folder)
    recover_parts(folder)
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
