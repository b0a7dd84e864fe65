"""Community LoRA files -> low-rank terms, each naming the torch Linear it updates; strictly.

Which key spellings a file may use is the model family's (`Family.lora_keys`, a `KeyLayout`: key prefixes
and suffixes, the first names of unprefixed modules); each key is told apart from its prefix and suffix.
FLUX models read the layouts diffusers' `FluxLoraLoaderMixin.load_lora_weights` reads (diffusers 0.42
`loaders/lora_conversion_utils.py`; `FLUX_KEYS`):

  diffusers/PEFT  transformer.<diffusers module>.lora_A.weight / .lora_B.weight [/ .alpha]
                  (text_encoder.<CLIP module>..., text_encoder_2.<T5 module>...; also the older
                  .lora.down/.lora.up and .lora_linear_layer.down/.up spellings, and .lora_down/.lora_up)
  kohya           lora_unet_<BFL module, dots as _>.lora_down.weight / .lora_up.weight / .alpha;
                  lora_te1_ (or lora_te_): CLIP, lora_te3_: T5 (sd-scripts' prefixes);
                  lora_transformer_<diffusers module, dots as _> (diffusers' "mixture" files)
  BFL/ai-toolkit  [diffusion_model. | model.diffusion_model. | base_model.model.]<BFL module>.lora_A.weight
                  (or .lora_down: ComfyUI's kohya files; text_encoders.clip_l/t5xxl.transformer.<module>)
  XLabs           [diffusion_model.]double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight,
                  single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight

Qwen-Image models read what `QwenImageLoraLoaderMixin` reads (`jaxedit.families.qwen_image`: diffusers
names behind `transformer.`, `diffusion_model.` or none, or kohya's `lora_unet_`).

Every format means W += (alpha / r) * up @ down for a module with weight W [out, in], down [r, in],
up [out, r]; without an alpha the scale is 1 (kohya: alpha defaults to the rank; XLabs has none).
A diffusers/PEFT file may instead carry PEFT's LoraConfig in its `lora_adapter_metadata` header
entry (lora_alpha, alpha_pattern, rank_pattern, use_rslora), as diffusers' own trainers write it.
Anything else is refused, named with its file: an unknown key, an up without its down, ranks that
disagree, DoRA/LyCORIS/bias/full-difference tensors and FLUX Control LoRAs (which replace norms
and widen the input), a module name the model does not have (`jaxedit.lora.targets`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from jaxedit import safetensors_file
from jaxedit.names.text import CLIP_PREFIX


class LoraError(ValueError):
    """A LoRA file that cannot be applied to the model; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One low-rank update read from a file: W += scale * up @ down, W [out, in] the weight of `module`."""

    key: str  # the file's key of the down factor: how errors name it
    part: str  # "transformer" | "clip" | "t5"
    naming: str  # how `module` is spelt: "bfl" | "diffusers" (transformer), "hf" (transformers' CLIP / T5)
    module: str  # dotted module name, e.g. "double_blocks.0.img_attn.qkv"
    down: np.ndarray  # [r, in] float32
    up: np.ndarray  # [out, r] float32
    scale: float


@dataclasses.dataclass(frozen=True)
class LoraTerms:
    """What one file holds: its terms, the layout(s) its keys were read as, and its sha256."""

    path: Path
    formats: tuple[str, ...]
    terms: tuple[Term, ...]
    sha256: str


# key suffix -> factor kind
SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """How the LoRA files of one family's models spell their keys (what diffusers' loader for them reads).

    A key is `<stem><suffix>`; the stem is a prefix and a module name (a prefix ending in "_" is kohya's: dots
    spelt "_"), or a bare module name whose first name is one of `bare`'s."""

    described: str  # the layouts, for messages: "diffusers/PEFT, kohya, BFL, XLabs"
    # (prefix of a key's stem, format, part, naming of the module names after it)
    prefixes: tuple[tuple[str, str, str, str], ...]
    bare: Mapping[str, tuple[str, str]]  # first name of an unprefixed transformer module -> (format, naming)
    suffixes: tuple[tuple[str, str], ...] = SUFFIXES  # key suffix -> "down" | "up" | "alpha"
    # formats in which an .alpha on some module means every module of the file has one (else its scale is 1)
    alpha_everywhere: tuple[str, ...] = ()
    xlabs: bool = False  # XLabs' FLUX keys (`double_blocks.N.processor.qkv_lora1.down.weight`, ...)
    # part -> a prefix its module names may carry beyond its name table's (CLIP: transformers < 5's `text_model.`)
    module_prefixes: Mapping[str, str] = dataclasses.field(default_factory=dict)


_BFL_TOP = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
_DIFFUSERS_TOP = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                  "time_text_embed", "norm_out", "proj_out")  # fmt: skip
FLUX_KEYS = KeyLayout(
    described="diffusers/PEFT, kohya, BFL, XLabs",
    prefixes=(
        ("lora_unet_", "kohya", "transformer", "bfl"),
        ("lora_transformer_", "kohya", "transformer", "diffusers"),
        ("lora_te1_", "kohya", "clip", "hf"),
        ("lora_te_", "kohya", "clip", "hf"),
        ("lora_te3_", "kohya", "t5", "hf"),
        ("transformer.", "diffusers", "transformer", "diffusers"),
        ("text_encoder.", "diffusers", "clip", "hf"),
        ("text_encoder_2.", "diffusers", "t5", "hf"),
        ("text_encoders.clip_l.transformer.", "bfl", "clip", "hf"),
        ("text_encoders.t5xxl.transformer.", "bfl", "t5", "hf"),
        ("model.diffusion_model.", "bfl", "transformer", "bfl"),
        ("diffusion_model.", "bfl", "transformer", "bfl"),
        ("base_model.model.", "bfl", "transformer", "bfl"),
    ),
    bare={top: ("bfl", "bfl") for top in _BFL_TOP} | {top: ("diffusers", "diffusers") for top in _DIFFUSERS_TOP},
    alpha_everywhere=("diffusers", "bfl"),
    xlabs=True,
    module_prefixes={"clip": CLIP_PREFIX},
)
_XLABS = re.compile(
    r"(?:diffusion_model\.)?(?P<block>double_blocks|single_blocks)\.(?P<n>\d+)\.processor\."
    r"(?P<kind>qkv|proj)_lora(?P<stream>[12]?)\.(?P<factor>down|up)\.weight"
)
_XLABS_DOUBLE = {("qkv", "1"): "img_attn.qkv", ("qkv", "2"): "txt_attn.qkv",
                 ("proj", "1"): "img_attn.proj", ("proj", "2"): "txt_attn.proj"}  # fmt: skip
# keys of adapters other than LoRA, refused by name: (pattern searched in the key, what it is)
_REFUSED = (
    (r"dora_scale|lora_magnitude_vector", "a DoRA magnitude (DoRA is not supported)"),
    (r"\.lokr_", "a LyCORIS LoKr factor (only LoRA is supported)"),
    (r"\.hada_", "a LyCORIS LoHa factor (only LoRA is supported)"),
    (r"\.diff(_b)?$", "a full weight or bias difference (only low-rank factors are supported)"),
    (r"\.lora_(B|up)\.bias$", "a LoRA bias (not supported)"),
    (r"norm\.scale$", "a norm scale: FLUX Control LoRAs (which replace norms and widen the input) are not supported"),
)
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' header entry: PEFT LoraConfig fields, prefixed by component
_METADATA_PREFIX = {"transformer": "transformer", "clip": "text_encoder", "t5": "text_encoder_2"}

KohyaNames = Callable[[str, str], Mapping[str, str]]  # (part, naming) -> {name with dots as "_": dotted name}


def _split(key: str, keys: KeyLayout) -> tuple[str, str] | None:
    """(stem, kind) of a LoRA factor or alpha key, None for any other key."""
    for suffix, kind in keys.suffixes:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], kind
    return None


def _classify(stem: str, keys: KeyLayout) -> tuple[str, str, str, str, bool] | None:
    """(format, part, naming, module name, spelt with "_" for ".") of a stem, None if no layout fits."""
    for prefix, fmt, part, naming in keys.prefixes:
        if stem.startswith(prefix):
            return fmt, part, naming, stem[len(prefix) :], prefix.endswith("_")
    top = stem.split(".")[0]
    if top in keys.bare:
        fmt, naming = keys.bare[top]
        return fmt, "transformer", naming, stem, False
    return None


def _peft_alphas(meta: dict, file: Path) -> dict[str, tuple[float, dict, dict, bool, int | None]]:
    """{part: (lora_alpha, alpha_pattern, rank_pattern, use_rslora, r)} from a diffusers header's PEFT configs."""
    out = {}
    for part, prefix in _METADATA_PREFIX.items():
        cfg = {k[len(prefix) + 1 :]: v for k, v in meta.items() if k.startswith(prefix + ".")}
        if not cfg:
            continue
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
            if cfg.get(flag):
                raise LoraError(f"{file}: header {PEFT_METADATA}: {prefix}.{flag} is set ({what}: not supported)")
        alpha, r = cfg.get("lora_alpha"), cfg.get("r")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise LoraError(f"{file}: header {PEFT_METADATA}: {prefix}.lora_alpha is {alpha!r}, not a finite number")
        patterns = [cfg.get(p) or {} for p in ("alpha_pattern", "rank_pattern")]
        if not all(isinstance(p, dict) for p in patterns):
            raise LoraError(f"{file}: header {PEFT_METADATA}: {prefix}.alpha_pattern/rank_pattern are not objects")
        for name, v in patterns[0].items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise LoraError(f"{file}: header {PEFT_METADATA}: {prefix}.alpha_pattern[{name!r}] is {v!r}, not a "
                                "finite number")  # fmt: skip
        out[part] = (float(alpha), *patterns, bool(cfg.get("use_rslora")), r if isinstance(r, int) else None)
    return out


def _pattern(patterns: dict, module: str):
    """PEFT's `get_pattern_key`: the value of the first pattern that matches the end of `module`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


F32_MAX = float(np.finfo(np.float32).max)


def check_term(path: Path, key: str, down: np.ndarray, up: np.ndarray, scale: float) -> None:
    """LoraError naming the file and key unless W += scale * up @ down is finite in float32: rank >= 1, finite
    factors and scale, and no entry of the update that could overflow (|scale| * r * max|up| * max|down|)."""
    r = down.shape[0]
    if r == 0:
        raise LoraError(f"{path}: key {key}: rank 0 (factors down {list(down.shape)}, up {list(up.shape)})")
    for name, x in (("down", down), ("up", up)):
        if not np.isfinite(x).all():
            raise LoraError(f"{path}: key {key}: the {name} factor holds NaN or inf")
    if not math.isfinite(scale):
        raise LoraError(f"{path}: key {key}: its scale alpha / r is {scale!r}, not a finite number")
    bound = abs(scale) * r * float(np.abs(up).max(initial=0.0)) * float(np.abs(down).max(initial=0.0))
    if not bound <= F32_MAX:
        big = f"factors up to {np.abs(up).max():.3g} and {np.abs(down).max():.3g} (rank {r}, scale {scale:.3g})"
        raise LoraError(f"{path}: key {key}: {big} make updates up to {bound:.3g}, beyond float32's range")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_terms(path: str | Path, kohya_names: KohyaNames, keys: KeyLayout = FLUX_KEYS) -> LoraTerms:
    """Every low-rank term of a LoRA safetensors file, its factors as float32 numpy; LoraError naming the file
    and the key for anything that is not a LoRA factor of a layout `keys` reads or does not fit (shapes are
    checked against the model later, by `jaxedit.lora.targets`). kohya_names(part, naming) resolves kohya
    names."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: not a .safetensors file (pickled .bin/.pt/.ckpt LoRAs are not read)")
    try:
        header = safetensors_file.read_header(path)
    except safetensors_file.SafetensorsFileError as e:
        raise LoraError(str(e)) from None
    handle = safe_open(str(path), framework="numpy")
    meta = handle.metadata() or {}

    def read(key: str) -> np.ndarray:
        shape, dtype = header[key]
        if not dtype.startswith(("F", "BF")):
            raise LoraError(f"{path}: {key}: dtype {dtype}, a LoRA factor is a float tensor")
        try:
            safetensors_file.numpy_dtype(dtype, f"{path}: {key}")
        except safetensors_file.SafetensorsFileError as e:
            raise LoraError(str(e)) from None
        return np.asarray(handle.get_tensor(key), np.float32)

    if not header:
        raise LoraError(f"{path}: holds no tensors")
    factors: dict[str, dict[str, str]] = {}  # stem (the key without its suffix) -> {kind: key}
    xlabs: dict[tuple[str, ...], dict[str, str]] = {}
    for key in header:
        m = _XLABS.fullmatch(key) if keys.xlabs else None
        if m:
            xlabs.setdefault((m["block"], m["n"], m["kind"], m["stream"]), {})[m["factor"]] = key
            continue
        split = _split(key, keys)
        refused = next((what for pattern, what in _REFUSED if re.search(pattern, key)), None)
        if refused or split is None or _classify(split[0], keys) is None:
            why = refused or f"not a LoRA factor or alpha of a layout jaxedit reads ({keys.described})"
            raise LoraError(f"{path}: key {key}: {why}")
        stem, kind = split
        slot = factors.setdefault(stem, {})
        if kind in slot:
            raise LoraError(f"{path}: key {key}: a second {kind} factor for {stem} (also {slot[kind]})")
        slot[kind] = key

    peft = {}
    if meta.get(PEFT_METADATA):
        try:
            config = json.loads(meta[PEFT_METADATA])
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise LoraError(f"{path}: header {PEFT_METADATA} is not a JSON object of PEFT LoraConfig fields")
        peft = _peft_alphas(config, path)
    has_alpha = {_classify(s, keys)[0] for s, kinds in factors.items() if "alpha" in kinds}
    if peft and has_alpha:
        raise LoraError(f"{path}: both .alpha keys and a {PEFT_METADATA} header (diffusers refuses such files too)")
    terms, formats = [], set()
    for stem, kinds in factors.items():
        fmt, part, naming, name, underscored = _classify(stem, keys)
        formats.add(fmt)
        missing = [k for k in ("down", "up") if k not in kinds]
        if missing:
            raise LoraError(f"{path}: key {next(iter(kinds.values()))}: no {' or '.join(missing)} factor for {stem}")
        if underscored:
            names = kohya_names(part, naming)
            if name not in names:
                raise LoraError(f"{path}: key {kinds['down']}: the {part} has no module {name!r} (kohya name)")
            name = names[name]
        down, up = read(kinds["down"]), read(kinds["up"])
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(f"{path}: key {kinds['down']}: down {list(down.shape)} and up {list(up.shape)} are not "
                            "[r, in] and [out, r] of one rank r")  # fmt: skip
        r = down.shape[0]
        if r == 0:
            check_term(path, kinds["down"], down, up, 1.0)
        if "alpha" in kinds:
            alpha = read(kinds["alpha"])
            if alpha.size != 1 or not np.isfinite(alpha).all():
                raise LoraError(f"{path}: key {kinds['alpha']}: an alpha is one finite number, got shape "
                                f"{list(alpha.shape)}")  # fmt: skip
            scale = float(alpha.reshape(())) / r
        elif part in peft and fmt == "diffusers":
            alpha, alpha_pattern, rank_pattern, rslora, r_cfg = peft[part]
            want = _pattern(rank_pattern, name) or r_cfg
            if want is not None and want != r:
                raise LoraError(f"{path}: key {kinds['down']}: rank {r}, its {PEFT_METADATA} says {want}")
            a = _pattern(alpha_pattern, name)
            scale = (alpha if a is None else float(a)) / (math.sqrt(r) if rslora else r)
        elif fmt in keys.alpha_everywhere and fmt in has_alpha:
            raise LoraError(f"{path}: key {kinds['down']}: other modules have an .alpha, {stem} has none")
        else:
            scale = 1.0
        check_term(path, kinds["down"], down, up, scale)
        terms.append(Term(kinds["down"], part, naming, name, down, up, scale))

    for (block, n, kind, stream), kinds in xlabs.items():
        formats.add("xlabs")
        key = kinds.get("down") or kinds["up"]
        if set(kinds) != {"down", "up"}:
            raise LoraError(f"{path}: key {key}: no {'up' if 'down' in kinds else 'down'} factor beside it")
        down, up = read(kinds["down"]), read(kinds["up"])
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(f"{path}: key {key}: down {list(down.shape)} and up {list(up.shape)} are not "
                            "[r, in] and [out, r] of one rank r")  # fmt: skip
        check_term(path, key, down, up, 1.0)
        if block == "double_blocks" and (kind, stream) in _XLABS_DOUBLE:
            module = f"double_blocks.{n}.{_XLABS_DOUBLE[kind, stream]}"
            terms.append(Term(key, "transformer", "bfl", module, down, up, 1.0))
        elif block == "single_blocks" and not stream and kind == "proj":
            module = f"single_transformer_blocks.{n}.proj_out"
            terms.append(Term(key, "transformer", "diffusers", module, down, up, 1.0))
        elif block == "single_blocks" and not stream and up.shape[0] % 3 == 0:
            # q, k, v rows in thirds, as diffusers' converter splits them (not the MLP rows of linear1)
            for i, qkv in enumerate(np.split(up, 3)):
                module = f"single_transformer_blocks.{n}.attn.to_{'qkv'[i]}"
                terms.append(Term(key, "transformer", "diffusers", module, down, qkv, 1.0))
        else:
            raise LoraError(f"{path}: key {key}: not an XLabs LoRA layer jaxedit reads")
    return LoraTerms(path, tuple(sorted(formats)), tuple(terms), _sha256(path))
