"""Pipeline options: one typed check for the command line's flags and a model folder's "pipeline" section.

A model folder's `jaxedit.json` may set the pipeline's defaults ({"steps": 12, "auto_resize": false, ...});
the same names are flags of `jaxedit edit` / `jaxedit batch`. Both go through `check_option`, so a value the
command line refuses (`--steps 100000000`) is refused from a downloaded folder too, before anything loads,
named by its field. Nothing here imports jax.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

MAX_STEPS = 1000  # denoising steps
MAX_GUIDANCE = 100.0
MAX_TOKENS = 1 << 20  # image tokens an option may name (a 16384 x 16384 image)
MAX_PROMPT_CHARS = 20_000  # characters of a prompt: longer ones are refused before any tokenizer sees them
TOKENS_PER_TRAINED_IMAGE = 8  # default max_image_tokens: 8x the tokens of one image at the training resolution
DEFAULT_RESOLUTION = 1024  # px: FLUX.1 Kontext's and Step1X-Edit's (a folder's "resolution" says otherwise)
REFERENCE_IDS = ("community", "community-own-sizes", "offset", "index")  # jaxedit.sampling.REFERENCE_IDS
DTYPES = ("bfloat16", "float32")
QUANTIZE = ("none", "int8", "fp8")


def _int(lo: int, hi: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"is {v!r}; expected an integer in [{lo}, {hi}]")
        if not lo <= v <= hi:
            raise ValueError(f"is {v}, outside [{lo}, {hi}]")
        return v

    return check


def _number(lo: float, hi: float):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"is {v!r}; expected a finite number in [{lo:g}, {hi:g}]")
        if not lo <= v <= hi:
            raise ValueError(f"is {v:g}, outside [{lo:g}, {hi:g}]")
        return float(v)

    return check


def _choice(*choices: str):
    def check(v):
        if v not in choices:
            raise ValueError(f"is {v!r}; expected one of {', '.join(map(repr, choices))}")
        return v

    return check


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError(f"is {v!r}; expected true or false")
    return v


def check_prompt(v, empty_ok: bool = False) -> str:
    """A prompt: a string of at most MAX_PROMPT_CHARS characters a tokenizer can encode (ValueError saying why)."""
    if not isinstance(v, str):
        raise ValueError(f"is {type(v).__name__}; expected a string")
    if not empty_ok and not v.strip():
        raise ValueError("is empty")
    if len(v) > MAX_PROMPT_CHARS:
        raise ValueError(f"is {len(v):,} characters, over the {MAX_PROMPT_CHARS:,} a prompt may have")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode: a lone surrogate {v[e.start]!r} at character {e.start}") from None
    return v


def _list(v):
    if not isinstance(v, list):
        raise ValueError(f"is {type(v).__name__}; expected a list")
    return v


def _mesh(v):
    """ "auto" or mesh axis sizes of one slice ("data=2,fsdp=4"); whether they use exactly the devices is checked
    when the pipeline is placed (`jaxedit.parallel.placement`)."""
    from jaxedit.configs import MeshConfig

    if v == "auto":
        return v
    if not isinstance(v, str):
        raise ValueError(f"is {v!r}; expected 'auto' or axis sizes such as 'data=2,fsdp=4'")
    try:
        cfg = MeshConfig.parse(v)
    except ValueError as e:
        raise ValueError(f"is {v!r}: {e}") from None
    if cfg.dcn_data != 1 or cfg.dcn_fsdp != 1:
        raise ValueError(f"is {v!r}: the pipelines run on one slice (no dcn_* axes)")
    return v


# name -> check (the value, or ValueError saying what is wrong with it)
def _scheduler(v: Any) -> Any:
    """The sampling schedule: an object of fields or the text of `--scheduler` (a named scheduler and/or
    KEY=VALUE items), for FLUX.1's schedule (`configs.FluxSchedulerConfig`) or diffusers' scheduler_config.json
    fields (`configs.SchedulerConfig`); the family's own type checks it again when the pipeline loads."""
    from jaxedit.configs import FluxSchedulerConfig, SchedulerConfig

    errors = []
    for kind in (SchedulerConfig, FluxSchedulerConfig):
        try:
            kind.from_option(v)
            return v
        except ValueError as e:
            errors.append(str(e))
    raise ValueError(f"is {v!r}: {errors[1]} (FLUX.1's schedule); {errors[0]} (diffusers' scheduler fields)")


def _cache(v: Any) -> str:
    """A step cache (`jaxedit.step_cache`): "off", "fbc:THRESHOLD" / "tea:THRESHOLD" (a number >= 0) or
    "schedule:FILE" (a folder's: a file inside it); the schedule file itself is read when the pipeline loads."""
    usage = "use 'off', 'fbc:THRESHOLD', 'tea:THRESHOLD' or 'schedule:FILE'"
    if not isinstance(v, str):
        raise ValueError(f"is {v!r}: {usage}")
    kind, _, arg = v.partition(":")
    if kind in ("off", "none") and not arg:
        return v
    if kind in ("fbc", "tea"):
        try:
            t = float(arg)
        except ValueError:
            t = math.nan
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"is {v!r}: {kind} takes a threshold >= 0, e.g. {kind}:0.08")
        return v
    if kind == "schedule" and arg:
        return v
    raise ValueError(f"is {v!r}: {usage}")


OPTIONS = {
    "steps": _int(1, MAX_STEPS),
    "guidance": _number(0.0, MAX_GUIDANCE),
    "true_cfg_scale": _number(1.0, MAX_GUIDANCE),
    "negative_prompt": lambda v: check_prompt(v, empty_ok=True),
    "dtype": _choice(*DTYPES),
    "quantize": _choice(*QUANTIZE),
    "auto_resize": _bool,
    "text_on_cpu": _bool,
    "random_weights": _bool,
    "reference_ids": _choice(*REFERENCE_IDS),
    "reference_tokens": _int(1, MAX_TOKENS),
    "max_image_tokens": _int(1, MAX_TOKENS),
    "size_level": _int(16, 4096),
    "resolution": _int(16, 4096),  # px, the side of the images the model was trained at
    "loras": _list,  # each entry: jaxedit.kontext.pipeline.folder_loras
    "mesh": _mesh,  # where the pipeline runs: jaxedit.parallel.placement
    "cache": _cache,  # step caching in the sampling loop (jaxedit.step_cache), off by default
    "scheduler": _scheduler,  # a diffusers scheduler_config.json's fields (Qwen-Image-Edit: configs.SchedulerConfig)
}


def max_image_tokens(options: dict) -> int:
    """The most image tokens (target + references, 16x16 px each) an item may have with a model folder: its
    option "max_image_tokens", else TOKENS_PER_TRAINED_IMAGE x those of one image at its training resolution
    (option "resolution", default 1024 px: 8 x 4,096). Larger items are refused in one line, before any work
    (a 4000 x 4000 photo kept at its size is 125,000 tokens: out of memory, not an edit)."""
    if "max_image_tokens" in options:
        return options["max_image_tokens"]
    return TOKENS_PER_TRAINED_IMAGE * (options.get("resolution", DEFAULT_RESOLUTION) // 16) ** 2


def check_option(name: str, value: Any, where: str) -> Any:
    """`value` as option `name`, or ValueError "WHERE is ...: what it takes" (where: the flag or the field)."""
    if name not in OPTIONS:
        raise ValueError(f"{where}: unknown option (known: {', '.join(sorted(OPTIONS))})")
    try:
        return OPTIONS[name](value)
    except ValueError as e:
        raise ValueError(f"{where} {e}") from None


def check_options(options: Any, where: str) -> dict:
    """A model folder's "pipeline" section, every field checked (`where`: "FOLDER/jaxedit.json: pipeline")."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} is {type(options).__name__}; expected an object of options")
    return {k: check_option(k, v, f"{where}.{k}") for k, v in options.items()}


def folder_loras(folder: Path, options: dict) -> list[tuple[Path, float, bool]]:
    """(file, scale, merge) of each default LoRA a model folder's pipeline option "loras" names: files inside the
    folder (a downloaded folder must not pull other files of the machine into its weights; links are followed
    to where they lead). ValueError naming jaxedit.json and the entry otherwise."""
    folder = Path(folder)
    entries, where = options.get("loras", []), f"{folder / 'jaxedit.json'}: pipeline.loras"
    if not isinstance(entries, list):
        raise ValueError(f"{where} is {type(entries).__name__}, not a list of {{path, scale, merge}}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or set(e) - {"path", "scale", "merge"}:
            raise ValueError(f'{where}[{i}] is {e!r}, not {{"path": file, "scale": number, "merge": bool}}')
        if not isinstance(e.get("merge", True), bool):
            raise ValueError(f"{where}[{i}].merge is {e['merge']!r}, not true or false")
        path = folder / e["path"]
        if Path(e["path"]).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"{where}[{i}].path {e['path']!r} leads outside the model folder: a folder's LoRAs are "
                             "files inside it (pass others on the command line, --lora)")  # fmt: skip
        if not path.is_file():
            raise ValueError(f"{where}[{i}].path: LoRA file {path} not found")
        scale = e.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ValueError(f"{where}[{i}].scale must be a finite number, got {scale!r}")
        out.append((path, float(scale), e.get("merge", True)))
    return out
