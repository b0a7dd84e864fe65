"""Training run configuration: `TrainConfig`, Python config files and `--set key=value` overrides.

A config file defines `get_config()` returning a `TrainConfig` (or `jaxedit.train.vae.VAETrainConfig`);
`python -m train --config NAME_OR_FILE --set data.path=/d` loads it and applies the overrides. The
project's configs (the `configs/` folder of a checkout) ship inside the package and can be named.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jaxedit
from jaxedit.train.data import DataConfig
from jaxedit.train.lora import LoraConfig
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig

_PACKAGE = Path(jaxedit.__file__).resolve().parent
# installed: the configs ship as jaxedit/run_configs; in a checkout they are the repository's configs/
CONFIG_FOLDERS = (_PACKAGE / "run_configs", _PACKAGE.parent / "configs")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = ""  # jaxedit model folder (transformer, vae, t5, clip, tokenizers): required
    init: str = "folder"  # folder: start from the folder's transformer; random: re-initialise it
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = 1000
    grad_accum: int = 1  # micro-batches per step (data.batch_size is split into them)
    mesh: str = "fsdp=-1"  # jaxedit.configs.MeshConfig.parse spec
    dtype: str = "bfloat16"  # compute dtype (master weights are float32)
    remat: str = "none"  # none | full | dots | dots_no_batch | offload (full, block inputs in host memory)
    mlp_chunks: int = 1  # the DiT's MLPs on this many slices of the tokens: a smaller working set, same result
    scan_layers: bool = True
    attention: str = "auto"
    seed: int = 0
    vae_sample: bool = False  # encode with a sample of the VAE posterior (default: its mean, as BFL)
    checkpoint_dir: str = "checkpoints/run"
    checkpoint_every: int = 100
    keep: int = 3
    log_every: int = 1
    async_checkpointing: bool = True
    lora: LoraConfig | None = None  # train LoRA adapters only; written as <checkpoint_dir>/lora.safetensors
    export_model: bool = False  # at the end, write the trained transformer (EMA if kept) into the model folder
    qwen: str = ""  # Step1X-Edit: a model folder whose converted Qwen2.5-VL to use ("": the model folder's own)
    qwen_cache: str = ""  # Step1X-Edit: folder of per-item Qwen outputs ("": <checkpoint_dir>/qwen_cache)
    sample_every: int = 0  # every N steps, edit `sample_count` training items with the current (EMA) weights
    sample_count: int = 4  # ... written as <checkpoint_dir>/samples/step_N.png (every model family)
    tensorboard: bool = True  # also write TensorBoard scalars when tensorboardX is installed


def override(cfg: Any, assignments: list[str]) -> Any:
    """Apply `a.b=value` assignments (value parsed as JSON, Python's True/False/None accepted, else
    kept as a string). A boolean field only takes a boolean: `--set x=False` must not become truthy."""
    for a in assignments:
        key, _, raw = a.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = {"True": True, "False": False, "None": None}.get(raw, raw)
        cfg = _replace(cfg, key.split("."), value, a)
    return cfg


def _replace(obj, keys, value, where):
    names = {f.name for f in dataclasses.fields(obj)}
    if keys[0] not in names:
        raise KeyError(f"--set {where}: {type(obj).__name__} has no field {keys[0]!r} (fields: {sorted(names)})")
    if len(keys) > 1:
        value = _replace(getattr(obj, keys[0]), keys[1:], value, where)
    elif isinstance(value, list):
        value = tuple(value)
    elif isinstance(getattr(obj, keys[0]), bool) and not isinstance(value, bool):
        raise ValueError(f"--set {where}: {keys[0]} is a boolean (true or false), got {value!r}")
    return dataclasses.replace(obj, **{keys[0]: value})


def find_config(name: str | Path) -> Path:
    """A config file: a path, or the name of one of the project's configs (`configs/<name>.py` of a checkout,
    shipped inside the installed package as `jaxedit/run_configs/<name>.py`)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".py")
    if path.parent == Path(".") or path.parent.name == "configs":
        for folder in CONFIG_FOLDERS:
            if (folder / f"{stem}.py").is_file():
                return folder / f"{stem}.py"
    known = sorted({p.stem for folder in CONFIG_FOLDERS if folder.is_dir() for p in folder.glob("*.py")})
    raise FileNotFoundError(f"config {str(name)!r} not found: not a file, nor one of {', '.join(known)}")


def load_config(path: str | Path, assignments: list[str] = ()) -> TrainConfig:
    """Run a Python config file (`find_config`) exposing `get_config() -> TrainConfig`, then apply overrides."""
    path = find_config(path)
    ns: dict[str, Any] = {"__file__": str(path), "__name__": "train_config"}
    exec(compile(Path(path).read_text(), str(path), "exec"), ns)  # noqa: S102 - configs are code
    if "get_config" not in ns:
        raise ValueError(f"{path}: a config file must define get_config()")
    return override(ns["get_config"](), list(assignments))
