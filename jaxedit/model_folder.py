"""jaxedit model folders: everything a pipeline needs, in one directory.

    FOLDER/jaxedit.json    {"format": "jaxedit-model", "version": 1, "preset": ..., "family": ...,
                            "config": {"transformer": {...}, "vae": {...}, "t5": {...}, "clip": {...}}}
    FOLDER/transformer/    Orbax checkpoint of each part's parameters
    FOLDER/vae/  FOLDER/t5/  FOLDER/clip/
    FOLDER/tokenizer/      CLIP tokenizer files    FOLDER/tokenizer_2/  T5 tokenizer files
    (jaxedit.json may also hold "pipeline": {...}, the model's pipeline defaults, e.g.
    {"auto_resize": false, "steps": 8, "guidance": 1.0} for a small model trained at its own sizes, or
    {"loras": [{"path": "style.safetensors", "scale": 0.8}]}: LoRA files applied at load, paths relative to
    the folder; see jaxedit.kontext.pipeline.)

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
import functools
import json
from pathlib import Path
from typing import Any

from jaxedit import configs, families

FORMAT, VERSION = "jaxedit-model", 1
TOKENIZERS = {"clip": "tokenizer", "t5": "tokenizer_2"}
# every sub-folder a model folder may hold (checkpoints, tokenizer and processor files), each sealed
SUBFOLDERS = ("transformer", "vae", "t5", "clip", "qwen", *TOKENIZERS.values(), "qwen_processor")


def preset_to_dict(preset: configs.Preset, options: dict | None = None) -> dict:
    described = families.of(preset).part_configs  # the parts (one folder each) and configs inside them (connector)
    cfg = {p: dataclasses.asdict(getattr(preset, p)) for p in described if getattr(preset, p) is not None}
    d = {"format": FORMAT, "version": VERSION, "preset": preset.name, "family": preset.family, "config": cfg}
    return d | ({"pipeline": dict(options)} if options else {})


def preset_from_dict(d: dict, where: str = "jaxedit.json") -> configs.Preset:
    if d.get("format") != FORMAT or d.get("version") != VERSION:
        raise ValueError(f"{where}: not a jaxedit model folder description (format {d.get('format')!r})")
    if d.get("family") not in families.names():
        raise ValueError(
            f"{where}: field 'family' is {d.get('family')!r}; expected one of {', '.join(families.names())}"
        )
    parts = {}
    for part, cls in families.get(d["family"]).part_configs.items():
        raw = d.get("config", {}).get(part) if isinstance(d.get("config"), dict) else None
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"{where}: config.{part} is {type(raw).__name__}; expected an object of fields")
        if raw is None:
            parts[part] = None
            continue
        wrong = configs.field_errors(cls, raw)
        if wrong:
            raise ValueError(f"{where}: {part} config: {'; '.join(wrong)}")
        try:
            parts[part] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        except ValueError as e:  # the config's own consistency checks (e.g. heads dividing the width)
            raise ValueError(f"{where}: {part} config: {e}") from None
    if parts["transformer"] is None:
        raise ValueError(f"{where}: no transformer config")
    return configs.Preset(d.get("preset", "custom"), d["family"], **parts)


def write_description(folder: Path, preset: configs.Preset, options: dict | None = None, extra: dict | None = None):
    """Write FOLDER/jaxedit.json (atomically). options: pipeline defaults stored with the model (e.g.
    {"auto_resize": False}); extra: further top-level entries (Step1X-Edit: "qwen")."""
    write_json(Path(folder) / "jaxedit.json", preset_to_dict(preset, options) | (extra or {}))


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON beside `path`, then rename it over `path` (`jaxedit.staged`)."""
    from jaxedit.staged import write_file

    write_file(path, json.dumps(data, indent=1) + "\n")


def read_json(folder: str | Path) -> dict:
    """FOLDER/jaxedit.json as a dict (FileNotFoundError naming the folder if it has none)."""
    return _read_description(folder)[1]


def _read_description(folder: str | Path) -> tuple[bytes, dict]:
    """(bytes, parsed object) of FOLDER/jaxedit.json, read once."""
    desc = Path(folder) / "jaxedit.json"
    recover_folder(folder)
    if not desc.is_file():
        raise FileNotFoundError(f"{folder} is not a jaxedit model folder (no jaxedit.json)")
    text = desc.read_bytes()
    try:
        d = json.loads(text.decode())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{desc}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{desc}: a JSON {type(d).__name__}, not an object describing a model folder")
    return text, d


def is_model_folder(folder: str | Path) -> bool:
    """A folder whose jaxedit.json says it is a jaxedit model folder."""
    try:
        return read_json(folder).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def options_from_dict(d: dict, folder: str | Path) -> dict:
    """The "pipeline" section of a parsed jaxedit.json, each option checked as the same command-line flag is
    (`jaxedit.options`) and its LoRA paths inside the folder: ValueError naming jaxedit.json and the field."""
    from jaxedit.options import check_options, folder_loras

    options = check_options(d.get("pipeline", {}), f"{Path(folder) / 'jaxedit.json'}: pipeline")
    folder_loras(Path(folder), options)  # their paths: inside the folder
    return options


def quantized_from_dict(d: dict, folder: str | Path) -> dict[str, str]:
    """The "quantized" record {part: mode} of a parsed jaxedit.json, checked: ValueError naming the field."""
    from jaxedit import quant

    raw = d.get("quantized", {})
    where = f"{Path(folder) / 'jaxedit.json'}: quantized"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} is {type(raw).__name__}; expected an object {{part: mode}}")
    for part, mode in raw.items():
        if part not in quant.RULES:
            raise ValueError(f"{where}.{part}: only {', '.join(quant.RULES)} are quantised")
        if mode not in quant.MODES:
            raise ValueError(f"{where}.{part} is {mode!r}; expected one of {', '.join(quant.MODES)}")
    return dict(raw)


def read_options(folder: str | Path) -> dict:
    """The pipeline defaults stored with a model (empty if none), each checked as the same command-line flag is
    (`jaxedit.options`): ValueError naming jaxedit.json and the field."""
    return options_from_dict(read_json(folder), folder)


def read_description(folder: str | Path) -> configs.Preset:
    """The preset (architecture of every part) a model folder describes."""
    return preset_from_dict(read_json(folder), str(Path(folder) / "jaxedit.json"))


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFolder:
    """A model folder opened once (`open`): its jaxedit.json read a single time and validated into the
    preset, the pipeline options (the command line's typed checks), the quantisation record and the raw
    "qwen" entry (Step1X-Edit: read by `jaxedit.step1x.text.qwen_section`). Every later step (the CLI, the
    pipelines' `load`, `load_parts`, the Qwen embedder) receives this value instead of the path."""

    path: Path
    preset: configs.Preset
    options: dict  # pipeline options, checked (`jaxedit.options`)
    quantized: dict  # {part: mode} of the parts stored quantised
    description: dict  # the whole parsed jaxedit.json
    text: bytes  # its bytes (part of the `fingerprint`)

    @classmethod
    def open(cls, folder: str | Path) -> ModelFolder:
        """Read and validate FOLDER/jaxedit.json (FileNotFoundError / ValueError naming it and the field)."""
        folder = Path(folder)
        text, d = _read_description(folder)
        preset = preset_from_dict(d, str(folder / "jaxedit.json"))
        return cls(folder, preset, options_from_dict(d, folder), quantized_from_dict(d, folder), d, text)

    @classmethod
    def of(cls, folder: str | Path | ModelFolder) -> ModelFolder:
        """`folder` itself if already opened, else `open(folder)`."""
        return folder if isinstance(folder, ModelFolder) else cls.open(folder)

    @property
    def family(self) -> str:
        return self.preset.family

    @property
    def json_path(self) -> Path:
        return self.path / "jaxedit.json"

    @property
    def qwen(self) -> dict:
        """The "qwen" entry (empty: none)."""
        return self.description.get("qwen") or {}


def write_part(folder: str | Path, part: str, params: Any) -> Path:
    """Replace FOLDER/<part> with `params` (a sealed Orbax checkpoint) without ever leaving the folder without
    a complete copy: written beside as .<part>.new, then the old part is moved aside and the new one renamed
    into place (`recover_parts` finishes a swap cut between those two renames). Collective on several
    processes (every process writes its shards; the main one renames)."""
    from jaxedit.checkpoint import save_params

    return save_params(Path(folder) / part, params, force=True)


def recover_folder(folder: str | Path) -> None:
    """Finish a replacement of the whole folder (a conversion with --force) cut between its two renames."""
    if not Path(folder).exists():
        from jaxedit.checkpoint import recover_dir

        recover_dir(Path(folder), complete="jaxedit.json")


def recover_parts(folder: str | Path) -> None:
    """Finish a `write_part` (or a sub-folder copy) cut between its two renames: a missing part whose
    complete new copy (.<part>.new) or old copy (.<part>.old) is beside it is put back in place."""
    from jaxedit.checkpoint import recover_dir

    for name in SUBFOLDERS:
        recover_dir(Path(folder) / name)


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


def fingerprint(folder: str | Path | ModelFolder) -> str:
    """A cheap identity of a model folder's contents (sha256 hex), no weights read: jaxedit.json's bytes (of an
    opened `ModelFolder`: those it was opened from) and each sub-folder's seal (the sha256 of its files,
    `jaxedit.checkpoint.seal`), so a copied or moved folder keeps it and a rewritten part changes it; an
    unsealed sub-folder counts by its path, files' sizes and modification times instead."""
    import hashlib

    from jaxedit.checkpoint import CHECKSUMS

    opened = folder if isinstance(folder, ModelFolder) else None
    folder = (opened.path if opened else Path(folder)).resolve()
    h = hashlib.sha256()
    if opened is not None:
        h.update(opened.text)
    elif (folder / "jaxedit.json").is_file():
        h.update((folder / "jaxedit.json").read_bytes())
    for sub in (
        sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []
    ):
        h.update(f"\0{sub.name}\0".encode())
        if (sub / CHECKSUMS).is_file():
            h.update((sub / CHECKSUMS).read_bytes())
            continue
        h.update(str(sub).encode())
        for f in sorted(p for p in sub.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(sub)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def check_complete(folder: str | Path, preset: configs.Preset, *, skip: tuple[str, ...] = ()) -> None:
    """Raise FileNotFoundError naming every part of the folder that is missing (parts in `skip` may be), and
    CheckpointError naming a damaged tokenizer file (their seals are verified; the parts' at load)."""
    from jaxedit.checkpoint import verify, verify_enabled

    folder = Path(folder)
    recover_folder(folder)
    recover_parts(folder)
    missing = [p for p in families.of(preset).present_parts(preset) if p not in skip and not (folder / p).is_dir()]
    missing += [d for p, d in TOKENIZERS.items() if getattr(preset, p) is not None and not (folder / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {folder} is incomplete: missing {', '.join(missing)}")
    if verify_enabled():
        for d in (*TOKENIZERS.values(), "qwen_processor"):
            if (folder / d).is_dir():
                verify(folder / d)


def read_quantized(folder: str | Path) -> dict[str, str]:
    """{part: mode} of the parts stored quantised (jaxedit.json "quantized", written by the converter's
    --quantize; `jaxedit.quant`), checked: ValueError naming the field."""
    return quantized_from_dict(read_json(folder), folder)


def expected_params(preset: configs.Preset, part: str, quantized: str | None = None) -> Any:
    """The parameter tree (ShapeDtypeStructs) the preset's `part` has, stored quantised with mode `quantized`
    (traced once per config and process)."""
    from jaxedit.quant import quantize_abstract

    return quantize_abstract(part, _expected_params(preset, part), quantized)


def part_shardings(preset: configs.Preset, part: str, mesh: Any, quantized: str | None = None) -> Any:
    """The NamedShardings of `part`'s parameters (stored quantised with mode `quantized`) on `mesh`, by the
    logical rule table (`jaxedit.parallel.sharding`)."""
    from jaxedit.parallel import sharding as sh
    from jaxedit.quant import quantize_abstract

    return sh.shardings(quantize_abstract(part, _expected_params(preset, part, True), quantized), mesh)


@functools.lru_cache(maxsize=32)
def _expected_params(preset: configs.Preset, part: str, boxed: bool = False) -> Any:
    return families.of(preset).abstract_params(preset, part, boxed=boxed)


def check_part(path: Path, stored: Any, expected: Any) -> None:
    """ValueError naming the checkpoint at `path` unless its stored tree has the expected names and shapes
    (e.g. a transformer checkpoint copied in as vae/)."""
    import jax

    def flat(tree):
        return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
                for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip

    got, want = flat(stored), flat(expected)
    problems = [f"{len(m)} missing (e.g. {m[0]})" for m in [sorted(set(want) - set(got))] if m]
    problems += [f"{len(x)} unexpected (e.g. {x[0]})" for x in [sorted(set(got) - set(want))] if x]
    problems += [f"{len(r)} of other shapes (e.g. {r[0]} {got[r[0]]}, expected {want[r[0]]})"
                 for r in [sorted(k for k in set(got) & set(want) if got[k] != want[k])] if r]  # fmt: skip
    if problems:
        raise ValueError(f"{path}: not the {path.name} this folder's jaxedit.json describes: parameters "
                         f"{'; '.join(problems)}")  # fmt: skip


def load_parts(
    folder: str | Path | ModelFolder,
    preset: configs.Preset | None = None,
    *,
    dtypes: dict[str, Any] | None = None,
    quantize: str | None = None,
    devices: dict[str, Any] | None = None,
    mesh: Any = None,
) -> dict[str, Any]:
    """{part: params} for every part the preset (default: the folder's) has, restored from the folder's Orbax
    checkpoints (each verified against its seal and against the parameter names and shapes the description
    implies). folder: an opened `ModelFolder` (its quantisation record is used) or a path.
    quantize: "int8" / "fp8": the parts `jaxedit.quant` quantises that are not stored so are quantised as they
    load (on the host, a tensor at a time); parts stored quantised must have been so with the same mode.
    devices: {part: device} to restore a part onto; mesh: restore the other parts straight into their
    shardings on this mesh (`part_shardings`; default: this process's first device)."""
    import jax

    from jaxedit import quant
    from jaxedit.checkpoint import as_stored_on, load_params, param_metadata, verify_enabled, verify_or_note

    if isinstance(folder, ModelFolder):
        folder, preset, stored = folder.path, preset or folder.preset, folder.quantized
    else:
        folder, stored = Path(folder), read_quantized(folder)
        preset = preset or read_description(folder)
    check_complete(folder, preset)
    dtypes = dtypes or {}
    quantize = quant.check_mode(quantize)
    parts = families.of(preset).present_parts(preset)
    metadata = {}
    for p in parts:
        if quantize and p in stored and stored[p] != quantize:
            raise ValueError(f"{folder / p} is stored quantised as {stored[p]}, not {quantize}")
        if verify_enabled():
            verify_or_note(folder / p)
        metadata[p] = param_metadata(folder / p)
        check_part(folder / p, metadata[p], expected_params(preset, p, stored.get(p)))
    out = {}
    for p in parts:
        dev = (devices or {}).get(p) or (None if mesh is not None else jax.local_devices()[0])
        quantizing = bool(quantize and p in quant.RULES and p not in stored)
        where = dev if dev is not None else part_shardings(preset, p, mesh, quantize if quantizing else stored.get(p))
        if quantizing:
            out[p] = load_quantizing(folder / p, p, quantize, dtypes.get(p), where)
        elif dev is not None:
            out[p] = load_params(folder / p, dtype=dtypes.get(p), device=dev, verify_checksums=False)
        else:  # as stored (names, shapes, dtypes), each array restored into its sharding
            out[p] = load_params(folder / p, as_stored_on(metadata[p], where), dtype=dtypes.get(p),
                                 verify_checksums=False)  # fmt: skip
    return out


def load_quantizing(path: Path, part: str, mode: str, dtype: Any = None, device: Any = None) -> dict:
    """A float checkpoint quantised as it loads (`quantized_on_host`), each leaf then placed on `device`
    (default: this process's first device; or a tree of shardings, as the quantised tree; the others cast to
    `dtype`)."""
    import jax
    import numpy as np
    from flax import traverse_util

    from jaxedit import quant

    flat, dev = quantized_on_host(path, part, mode), device or jax.local_devices()[0]
    where = traverse_util.flatten_dict(dev, sep="/") if isinstance(dev, dict) else None
    for k, v in flat.items():
        keep = dtype is None or quant.keeps_dtype(k, v.dtype)
        flat[k] = jax.device_put(v if keep else np.asarray(v).astype(dtype), dev if where is None else where[k])
    return traverse_util.unflatten_dict(flat, sep="/")


def quantized_on_host(path: Path, part: str, mode: str) -> dict[str, Any]:
    """{"/"-path: array} of a float checkpoint restored into host memory (the CPU device, whatever the
    default device is) with each kernel the rules name quantised there (`jaxedit.quant.quantize_flat`)."""
    import jax
    from flax import traverse_util

    from jaxedit import quant
    from jaxedit.checkpoint import load_params

    host = load_params(path, device=jax.devices("cpu")[0], verify_checksums=False)
    flat = traverse_util.flatten_dict(host, sep="/")
    return quant.quantize_flat(part, flat, mode)
