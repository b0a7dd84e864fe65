"""Model presets: frozen dataclasses, looked up by name with `get(name)`.

A preset names one model family and holds the architecture of each of its parts.
Every architecture number of the full-size models lives here; modules read them
from their config and hard-code none. Runtime choices (dtypes, scan, remat,
attention kernel) are module arguments, not part of a preset.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FluxConfig:
    """The MMDiT of FLUX.1 (BFL `FluxParams`): double-stream then single-stream blocks."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # pooled text vector (CLIP-L)
    context_in_dim: int = 4096  # text tokens (T5-XXL)
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per id axis; sums to head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # guidance-distilled models (FLUX.1 [dev], Kontext)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"FluxConfig: sum(axes_dim) {sum(self.axes_dim)} != head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"FluxConfig: every axes_dim entry must be even, got {self.axes_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def stacks(self) -> tuple[tuple[str, int], ...]:
        """(parameter key, layers) of each stack of blocks (`nn.scan`-stacked parameters)."""
        return (("double_blocks", self.depth), ("single_blocks", self.depth_single_blocks))


@dataclass(frozen=True)
class ConnectorConfig:
    """Step1X-Edit's Qwen2 connector (S1X `Qwen2Connector`): LLM hidden states -> DiT text
    tokens [B, L, hidden_size] and a pooled vector [B, pooled_dim]."""

    in_channels: int = 3584  # Qwen2.5-VL-7B hidden size
    hidden_size: int = 4096  # = the DiT's context_in_dim
    num_heads: int = 32
    depth: int = 2  # token refiner blocks
    mlp_ratio: float = 4.0
    pooled_dim: int = 768  # = the DiT's vec_in_dim
    qkv_bias: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ConnectorConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class AutoEncoderConfig:
    """The FLUX 16-channel VAE (BFL `AutoEncoderParams`; Step1X-Edit ships the same)."""

    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    norm_groups: int = 32
    eps: float = 1e-6
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side (8 for ch_mult of length 4)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 encoder (transformers `T5EncoderModel`, gated-GELU FFN)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    max_length: int = 512  # FLUX pads/truncates prompts to this many tokens


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text tower (transformers `CLIPTextModel`); FLUX uses its pooled output."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # 2 = legacy configs: pool at argmax(input_ids), as transformers does
    max_length: int = 77


@dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. One of data/fsdp may be -1 (all remaining devices).

    dcn_* are the sizes across slices (multi-slice TPU: data-center network); the
    per-slice (ICI) sizes are data/fsdp/tensor.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1

    @classmethod
    def parse(cls, spec: str) -> MeshConfig:
        """'fsdp=4,tensor=2' -> MeshConfig(data=1, fsdp=4, tensor=2). Unnamed axes default to 1."""
        sizes = {"data": 1, "fsdp": 1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            if name not in sizes:
                raise ValueError(
                    f"mesh spec {spec!r}: unknown axis {name!r} (use data, fsdp, tensor, dcn_data, dcn_fsdp)"
                )
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: {name} needs an integer size, got {value!r}") from None
        return cls(**sizes)


@dataclass(frozen=True)
class QwenVisionConfig:
    """Qwen2.5-VL's vision tower (transformers `Qwen2_5_VisionTransformerPretrainedModel`); defaults: 7B."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels: windows of (112 / 14 / 2)^2 = 16 merged patches
    out_hidden_size: int = 3584  # the language model's width
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # one flattened patch: channels x temporal x patch x patch
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class QwenTextConfig:
    """Qwen2.5-VL's language model (`Qwen2_5_VLTextModel`); defaults: 7B."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)  # rotary pairs for (temporal, height, width)
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self}: hidden_size % num_heads and num_heads % num_kv_heads must be 0")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} does not cover head_dim {self.head_dim} / 2")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class QwenVLConfig:
    """Qwen2.5-VL (vision tower + language model + lm_head) and its special token ids; defaults: 7B-Instruct."""

    vision: QwenVisionConfig = QwenVisionConfig()
    text: QwenTextConfig = QwenTextConfig()
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, d: dict) -> QwenVLConfig:
        """From a transformers config.json: the 4.x layout (text fields at the top, `rope_scaling`) or the
        5.x one (`text_config`, `rope_parameters`)."""
        t = {**{k: v for k, v in d.items() if k != "text_config"}, **(d.get("text_config") or {})}
        v = d.get("vision_config") or {}
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        try:
            text = QwenTextConfig(
                vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
                num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
                rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
                mrope_section=tuple(rope["mrope_section"]), hidden_act=t.get("hidden_act", "silu"),
            )  # fmt: skip
            vision = QwenVisionConfig(
                depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                num_heads=v["num_heads"], in_channels=v.get("in_channels", v.get("in_chans", 3)),
                patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
                spatial_merge_size=v["spatial_merge_size"], window_size=v["window_size"],
                out_hidden_size=v["out_hidden_size"], fullatt_block_indexes=tuple(v["fullatt_block_indexes"]),
                hidden_act=v.get("hidden_act", "silu"),
                rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            )  # fmt: skip
        except KeyError as e:
            raise ValueError(f"Qwen2.5-VL config.json: missing field {e.args[0]!r}") from None
        for where, act in (("hidden_act", text.hidden_act), ("vision_config.hidden_act", vision.hidden_act)):
            if act not in ("silu", "gelu"):
                raise ValueError(f"Qwen2.5-VL config.json: {where} {act!r} is not supported (silu, gelu)")
        ids = {k: d.get(k, t.get(k)) for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id")}
        missing = [k for k, x in ids.items() if x is None]
        if missing:
            raise ValueError(f"Qwen2.5-VL config.json: missing field {missing[0]!r}")
        return cls(vision, text, **ids, tie_word_embeddings=bool(t.get("tie_word_embeddings", False)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QwenVLConfig:
        tup = lambda sub: {k: tuple(x) if isinstance(x, list) else x for k, x in sub.items()}  # noqa: E731
        rest = {k: x for k, x in d.items() if k not in ("vision", "text")}
        return cls(QwenVisionConfig(**tup(d["vision"])), QwenTextConfig(**tup(d["text"])), **rest)


@dataclass(frozen=True)
class QwenImageConfig:
    """diffusers `QwenImageTransformer2DModel`'s config (the same field names); the defaults are the released
    Qwen-Image(-Edit) DiT. `theta` and `mlp_ratio` are fixed in diffusers' code, not config fields."""

    patch_size: int = 2
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 16  # latent channels; the output has patch_size**2 * out_channels features per token
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # (frame, height, width); sums to attention_head_dim
    zero_cond_t: bool = False  # 2511: reference tokens modulated with timestep 0
    guidance_embeds: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    theta: int = 10_000
    mlp_ratio: int = 4

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(d) for d in self.axes_dims_rope))
        unsupported = [f for f in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope") if getattr(self, f)]
        if unsupported:
            raise ValueError(f"QwenImageConfig: {', '.join(unsupported)} not supported (only zero_cond_t is)")
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"QwenImageConfig: axes_dims_rope must be 3 even sizes, got {self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"QwenImageConfig: sum(axes_dims_rope) {sum(self.axes_dims_rope)} != attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return self.hidden_size * self.mlp_ratio

    @property
    def stacks(self) -> tuple[tuple[str, int], ...]:
        """(parameter key, layers) of each stack of blocks (`nn.scan`-stacked parameters)."""
        return (("transformer_blocks", self.num_layers),)

    @property
    def out_features(self) -> int:
        """Features per output token: a patch of `out_channels` latents."""
        return self.patch_size**2 * self.out_channels

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> QwenImageConfig:
        """From a diffusers `transformer/config.json` (keys starting with `_` ignored; unknown keys raise)."""
        known = {f.name for f in dataclasses.fields(cls)}
        items = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"QwenImageConfig: unknown config keys {unknown}")
        if items.get("out_channels", 16) is None:  # diffusers: out_channels defaults to in_channels
            items["out_channels"] = items.get("in_channels", cls.in_channels)
        return cls(**items)

    @classmethod
    def tiny(cls, **kw) -> QwenImageConfig:
        """A 2-layer, 3-head x 16 test model with 40-wide text features."""
        base = dict(num_layers=2, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=40)
        return cls(**{**base, "axes_dims_rope": (4, 6, 6), **kw})  # kw may change any of them


# the published Qwen-Image VAE (Qwen/Qwen-Image `vae/config.json`, also diffusers' defaults)
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class QwenImageVAEConfig:
    """diffusers `AutoencoderKLQwenImage` config fields (defaults: the published Qwen-Image VAE).

    `dropout` is kept for the config's sake (inference runs without it). `attn_scales` must be empty:
    diffusers' encoder cannot run the attention blocks it would add (they take no feature cache).
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"QwenImageVAEConfig: temperal_downsample {self.temperal_downsample} needs one entry per "
                f"downsampling level ({len(self.dim_mult) - 1} for dim_mult {self.dim_mult})"
            )
        if self.attn_scales:
            raise ValueError(f"QwenImageVAEConfig: attn_scales {self.attn_scales} is not supported (only [])")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"QwenImageVAEConfig: latents_mean and latents_std need z_dim={self.z_dim} values each")

    @classmethod
    def from_diffusers(cls, config: dict) -> QwenImageVAEConfig:
        """From a diffusers `vae/config.json` (its "_..." keys ignored; an unknown field raises)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
        if unknown:
            raise ValueError(f"AutoencoderKLQwenImage config: unknown field(s) {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})

    @property
    def in_channels(self) -> int:
        return self.input_channels

    @property
    def z_channels(self) -> int:
        return self.z_dim

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side (diffusers' `spatial_compression_ratio`: 8)."""
        return 2 ** len(self.temperal_downsample)


class SchedulerFields:
    """What both schedulers' configs share: read from an object of fields or the folder option, written back."""

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        """From a scheduler_config.json's fields (the others, e.g. "_class_name", ignored); ValueError naming a
        field of the wrong type."""
        if not isinstance(d, dict):
            raise ValueError(f"a scheduler is an object of fields, not {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: typed(v, None, hints[k], k) for k, v in d.items() if k in hints})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_option(cls, value: Any) -> Any:
        """The folder option "scheduler": an object of fields (`from_dict`) or the text of `--scheduler`
        (`parse`: a named scheduler and/or KEY=VALUE items)."""
        return cls.parse(value) if isinstance(value, str) else cls.from_dict(value)


@dataclass(frozen=True)
class SchedulerConfig(SchedulerFields):
    """The fields of a diffusers `scheduler/scheduler_config.json` the edit pipelines use (the converter copies a
    release's into the model folder's pipeline option "scheduler"); defaults: Qwen-Image's."""

    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"
    use_dynamic_shifting: bool = True
    shift: float = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"scheduler time_shift_type {self.time_shift_type!r}: use exponential or linear")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"scheduler shift_terminal {self.shift_terminal} is outside [0, 1)")

    @classmethod
    def parse(cls, text: str, base: SchedulerConfig | None = None) -> SchedulerConfig:
        """A scheduler from the command line's `--scheduler`: comma-separated items, each a named scheduler
        (`SCHEDULERS`: "lightning", "default"), which replaces the whole config, or KEY=VALUE setting one field
        over what came before (`base`, else Qwen-Image's); a VALUE is a number, true/false (on/off), none,
        exponential / linear, or ln(X). ValueError (one line) naming a bad item."""
        return parse_fields(cls, text, base, SCHEDULERS)


@dataclass(frozen=True)
class FluxSchedulerConfig(SchedulerFields):
    """FLUX.1's schedule (FLUX.1 Kontext, Step1X-Edit): sigmas linear from 1 to 0 over the steps, time-shifted by
    mu linear in the target's token count (diffusers' FlowMatchEulerDiscreteScheduler with use_dynamic_shifting,
    as FluxKontextPipeline sets it: mu from base_shift at base_image_seq_len to max_shift at max_image_seq_len)
    when `shift` is on; off: the plain linear sigmas (diffusers' with use_dynamic_shifting false and shift 1)."""

    shift: bool = True  # the resolution-dependent shift
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    def __post_init__(self):
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError(f"scheduler max_image_seq_len {self.max_image_seq_len} must be over base_image_seq_len "
                             f"{self.base_image_seq_len}")  # fmt: skip
        if not all(math.isfinite(v) for v in (self.base_shift, self.max_shift)):
            raise ValueError(
                f"scheduler base_shift / max_shift must be finite, got {self.base_shift}, {self.max_shift}"
            )

    @classmethod
    def parse(cls, text: str, base: FluxSchedulerConfig | None = None) -> FluxSchedulerConfig:
        """`--scheduler` for FLUX.1's schedule: comma-separated items, a named scheduler (`FLUX_SCHEDULERS`:
        "default", "linear") or KEY=VALUE over what came before (`base`, else FLUX.1's), e.g. shift=off or
        base_shift=0.5,max_shift=1.15. ValueError (one line) naming a bad item."""
        return parse_fields(cls, text, base, FLUX_SCHEDULERS)


def parse_fields(cls, text: str, base: Any, named: dict) -> Any:
    """Comma-separated items over `base` (else cls()): a name of `named` replaces the whole config, KEY=VALUE sets
    one field (`scheduler_value`, then checked as the field's type). ValueError (one line) naming a bad item."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"scheduler {text!r}: name one of {', '.join(named)} or give KEY=VALUE")
    cfg, hints = base or cls(), typing.get_type_hints(cls)
    for item in (t.strip() for t in text.split(",")):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            if key not in named:
                raise ValueError(f"scheduler {item!r}: name one of {', '.join(named)} or give KEY=VALUE")
            cfg = named[key]
            continue
        if key not in hints:
            raise ValueError(f"scheduler {key!r} is not a field: use {', '.join(hints)}")
        cfg = dataclasses.replace(cfg, **{key: typed(scheduler_value(raw.strip()), raw.strip(), hints[key], key)})
    return cfg


def scheduler_value(raw: str):
    """A `--scheduler` VALUE: none -> None, true/false or on/off, an int, a float, ln(X) -> log X, else the text."""
    low = raw.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false", "on", "off"):
        return low in ("true", "on")
    if low.startswith("ln(") and low.endswith(")"):
        try:
            return math.log(float(low[3:-1]))
        except ValueError:
            return raw
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


# named schedulers of `--scheduler` (`SchedulerConfig.parse`); lightning: lightx2v's Qwen-Image-Lightning 4- / 8-step
# LoRAs' (their model card's scheduler_config: shift ln 3 at every size, no terminal stretch), with 4 or 8 steps and
# --true-cfg-scale 1
SCHEDULERS = {
    "default": SchedulerConfig(),
    "lightning": SchedulerConfig(base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None),
}
# named schedulers of FLUX.1's `--scheduler` (`FluxSchedulerConfig.parse`): default (the resolution-dependent
# shift, FLUX.1-dev's and Kontext's scheduler_config), linear (no shift: the plain linear sigmas)
FLUX_SCHEDULERS = {"default": FluxSchedulerConfig(), "linear": FluxSchedulerConfig(shift=False)}


@dataclass(frozen=True)
class Preset:
    """A named model: its family and the config of each part (None where a part is absent)."""

    name: str
    family: str  # a family's name (`jaxedit.families`): "flux-kontext", "step1x-edit", "qwen-image-edit", ...
    transformer: Any  # the family's config type of each part (`jaxedit.families.Family.configs`)
    vae: Any = None
    t5: T5Config | None = None
    clip: CLIPTextConfig | None = None
    connector: ConnectorConfig | None = None  # Step1X-Edit: stored in the transformer checkpoint
    qwen: QwenVLConfig | None = None  # Step1X-Edit: the Qwen2.5-VL conditioner


# Architectures the presets (each family's: `jaxedit.families`, `jaxedit.presets`) are made of.
FLUX_DEV = FluxConfig()
FLUX_VAE = AutoEncoderConfig()
T5_XXL = T5Config()
CLIP_L = CLIPTextConfig()
# tiny widths, full structure: for tests, demos and benchmarks
TINY_FLUX = FluxConfig(
    context_in_dim=32,
    vec_in_dim=24,
    hidden_size=48,
    num_heads=3,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(4, 6, 6),
)
TINY_VAE = AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
# the published Qwen2.5-VL-Instruct models, as judges (`jaxedit.presets.JUDGES`; `jaxedit plan --task generate`):
# 7B = the defaults; 72B: the same vision tower with a merger into 8192 wide, 80 layers, 64 heads over 8 key/value
# heads, MLP 29568 (its config.json)
QWEN_VL_7B = QwenVLConfig()
QWEN_VL_72B = QwenVLConfig(
    QwenVisionConfig(out_hidden_size=8192),
    QwenTextConfig(hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64, num_kv_heads=8),
)
# the tiny presets' Qwen2.5-VL, width 28 (for planning and compile tests: a converted folder carries its own)
TINY_QWEN_VL = QwenVLConfig(
    QwenVisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, window_size=56, out_hidden_size=28,
                     fullatt_block_indexes=(1,)),
    QwenTextConfig(vocab_size=256, hidden_size=28, intermediate_size=40, num_layers=2, num_heads=2, num_kv_heads=1,
                   mrope_section=(1, 3, 3)),
    image_token_id=250, vision_start_token_id=251, vision_end_token_id=252,
)  # fmt: skip


def typed(value, raw: str | None, hint, field: str):
    """`value` as a value of the annotation `hint` (ints stay ints, floats take ints, tuples from lists), or
    ValueError naming `field` and what it takes. raw: the text of a string field as written."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [h for h in args if h is not type(None)]
        if len(options) == 1:
            return typed(value, raw, options[0], field)
        for h in options:
            try:
                return typed(value, raw, h, field)
            except ValueError:
                pass
    elif (hint is bool and isinstance(value, bool)) or (hint is int and type(value) is int):
        return value
    elif hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif hint is str and (isinstance(value, str) or raw is not None):
        return value if isinstance(value, str) else raw
    elif origin is tuple and isinstance(value, list | tuple):
        items = args[:1] * len(value) if args[1:] == (...,) else args
        if len(items) == len(value):
            return tuple(typed(v, None, h, f"{field}[{i}]") for i, (v, h) in enumerate(zip(value, items)))
    elif dataclasses.is_dataclass(hint) and isinstance(value, hint):
        return value
    raise ValueError(f"{field} is {describe_type(hint, field)}, got {value!r}")


def describe_type(hint, field: str) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(describe_type(h, field) for h in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} (set its fields: --set {field}.NAME=VALUE)"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if args[1:] == (...,):
            return f"a list of {describe_type(args[0], field)}s"
        return f"a list of {len(args)}: [{', '.join(describe_type(h, field) for h in args)}]"
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, "None" if hint is type(None) else getattr(hint, "__name__", str(hint)))


# the ranges of an architecture's numbers read from a file: sizes and counts are integers in [1, MAX_SIZE]
# (but for those below), numbers are finite (a NaN scale factor would make every image black)
MAX_SIZE = 1 << 20
INT_RANGES = {"eos_token_id": (0, MAX_SIZE), "max_length": (1, 4096)}  # tokens a prompt is padded to


def field_errors(cls: type, raw: dict) -> list[str]:
    """What is wrong with `raw` (e.g. parsed JSON) as the fields of dataclass `cls`: unknown names, values
    of the wrong type (`typed`), integers outside their range (INT_RANGES, else [1, MAX_SIZE]) and numbers that
    are not finite, one entry each."""
    hints = typing.get_type_hints(cls)
    out = [f"unknown field {k!r}" for k in raw if k not in hints]
    for k, v in raw.items():
        try:
            if k in hints:
                value = typed(v, None, hints[k], k)
                for i, x in enumerate(value if isinstance(value, tuple) else (value,)):
                    name = f"{k}[{i}]" if isinstance(value, tuple) else k
                    lo, hi = INT_RANGES.get(k, (1, MAX_SIZE))
                    if type(x) is int and not lo <= x <= hi:
                        raise ValueError(f"{name} is {x}, outside [{lo}, {hi}]")
                    if type(x) is float and not math.isfinite(x):
                        raise ValueError(f"{name} is {x}, not a finite number")
        except ValueError as e:
            out.append(str(e))
    return out
