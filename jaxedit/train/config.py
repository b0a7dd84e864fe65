"""Training run configuration: `TrainConfig`, Python config files and `--set key=value` overrides.

A config file defines `get_config()` returning a `TrainConfig` (or `jaxedit.train.vae.VAETrainConfig`);
`python -m train --config NAME_OR_FILE --set data.path=/d` loads it and applies the overrides. The
project's configs (the `configs/` folder of a checkout) ship inside the package and can be named.
An override takes the field's type (an int field takes integers only, a float field numbers, a sub-config
only its own fields) and the loaded config is checked against `RANGES`, so a bad value stops the command
in one line naming the field, before any work.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jaxedit
from jaxedit.configs import typed
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
    mesh: str = "fsdp=-1"  # jaxedit.configs.MeshConfig.parse spec, or "auto" (jaxedit.train.loop.train_mesh)
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


Range = tuple[str, Callable[[Any], bool]]
AT_LEAST_0: Range = (">= 0", lambda v: v >= 0)
AT_LEAST_1: Range = (">= 1", lambda v: v >= 1)
POSITIVE: Range = ("> 0", lambda v: v > 0)
FRACTION: Range = ("in [0, 1]", lambda v: 0 <= v <= 1)
DECAY: Range = ("in [0, 1)", lambda v: 0 <= v < 1)
EVERY = {"checkpoint_every": AT_LEAST_1, "keep": AT_LEAST_1, "log_every": AT_LEAST_1, "seed": AT_LEAST_0}
# config class name -> {field: (what it must be, test)}; None (an optional setting left off) is not tested
RANGES: dict[str, dict[str, Range]] = {
    "TrainConfig": EVERY | {"steps": AT_LEAST_1, "grad_accum": AT_LEAST_1, "mlp_chunks": AT_LEAST_1,
                            "sample_every": AT_LEAST_0, "sample_count": AT_LEAST_1},
    "VAETrainConfig": EVERY | {"steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "crop": AT_LEAST_1, "lr": POSITIVE,
                               "warmup_steps": AT_LEAST_0, "kl_weight": AT_LEAST_0, "l1_weight": AT_LEAST_0,
                               "max_images": AT_LEAST_1, "stats_images": AT_LEAST_1},
    "DataConfig": {"batch_size": AT_LEAST_1, "pixel_budget": (">= 256", lambda v: v >= 256),
                   "bucket_step": (">= 16", lambda v: v >= 16), "max_aspect": AT_LEAST_1, "seed": AT_LEAST_0,
                   "num_threads": AT_LEAST_0, "prefetch": AT_LEAST_0},
    "OptimConfig": {"lr": POSITIVE, "warmup_steps": AT_LEAST_0, "decay_steps": AT_LEAST_0,
                    "final_lr_fraction": FRACTION, "b1": DECAY, "b2": DECAY, "eps": POSITIVE,
                    "weight_decay": AT_LEAST_0, "clip_norm": POSITIVE, "ema_decay": DECAY},
    "ObjectiveConfig": {"logit_std": POSITIVE},  # the rest: its own __post_init__
    "LoraConfig": {"rank": AT_LEAST_1, "alpha": POSITIVE},
}  # fmt: skip


def override(cfg: Any, assignments: list[str]) -> Any:
    """Apply `a.b=value` assignments (value parsed as JSON, Python's True/False/None accepted, else kept as a
    string), each converted to the field's type or refused: ValueError (KeyError for an unknown field)
    naming the assignment and what the field takes. A string field takes the text as written; an optional
    sub-config that is off (None) is turned on with a JSON object (`lora={}`, `lora={"rank": 8}`)."""
    for a in assignments:
        key, eq, raw = a.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {a}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = {"True": True, "False": False, "None": None}.get(raw, raw)
        try:
            cfg = _replace(cfg, key.split("."), value, raw)
        except KeyError as e:
            raise KeyError(f"--set {a}: {e.args[0]}") from None
        except ValueError as e:
            raise ValueError(f"--set {a}: {e}") from None
    return cfg


def _replace(obj, keys: list[str], value, raw: str | None, path: str = ""):
    names = {f.name for f in dataclasses.fields(obj)}
    name, field = keys[0], path + keys[0]
    if name not in names:
        raise KeyError(f"{type(obj).__name__} has no field {name!r} (fields: {sorted(names)})")
    hint, current = typing.get_type_hints(type(obj))[name], getattr(obj, name)
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            on = f"; turn it on first: --set {field}={{}}" if current is None and _config_class(hint) else ""
            raise ValueError(f"{field} is {current!r}, it has no field {keys[1]!r}{on}")
        value = _replace(current, keys[1:], value, raw, field + ".")
    elif isinstance(value, dict) and current is None and (cls := _config_class(hint)):
        new = cls()
        for k, v in value.items():
            new = _replace(new, [k], v, None, field + ".")
        value = new
    else:
        value = typed(value, raw, hint, field)
    return dataclasses.replace(obj, **{name: value})  # the class's own checks (__post_init__) run here


def _config_class(hint) -> type | None:
    """The dataclass a field holds (also when optional), else None."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((h for h in options if dataclasses.is_dataclass(h)), None)


def check(cfg: Any, path: str = "") -> None:
    """Every field of a config (and of its sub-configs) has its annotated type and lies in `RANGES`;
    ValueError naming the first field that does not."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, field = getattr(cfg, f.name), path + f.name
        typed(value, None, hints[f.name], field)
        if dataclasses.is_dataclass(value):
            check(value, field + ".")
        elif value is not None and f.name in RANGES.get(type(cfg).__name__, {}):
            what, ok = RANGES[type(cfg).__name__][f.name]
            if not ok(value):
                raise ValueError(f"{field} must be {what}, got {value!r}")


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
    """Run a Python config file (`find_config`) exposing `get_config() -> TrainConfig`, apply the overrides, then
    `check` the result (ValueError / KeyError naming the field)."""
    path = find_config(path)
    ns: dict[str, Any] = {"__file__": str(path), "__name__": "train_config"}
    exec(compile(Path(path).read_text(), str(path), "exec"), ns)  # noqa: S102 - configs are code
    if "get_config" not in ns:
        raise ValueError(f"{path}: a config file must define get_config()")
    cfg = override(ns["get_config"](), list(assignments))
    check(cfg)
    return cfg
