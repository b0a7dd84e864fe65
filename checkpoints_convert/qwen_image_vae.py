"""Key table for the Qwen-Image VAE: diffusers `AutoencoderKLQwenImage` (Qwen/Qwen-Image `vae/`, shared by
the Qwen-Image-Edit releases) -> jaxedit `QwenImageVAE`, which runs it on single images.

Our parameter paths are diffusers' names, so the table is the identity on names; what it does to tensors:
- a causal 3-D conv weight [O, I, kt, kh, kw] keeps its last time tap [:, :, kt - 1] -> kernel [kh, kw, I, O]
  (on one frame the other taps meet the causal zero padding); the other taps are declared `Unused`;
- the `time_conv` of the "downsample3d" / "upsample3d" resamplers (weight and bias) is `Unused` whole: it
  acts only between frames;
- RMS-norm gammas [C, 1, 1, 1] (attention: [C, 1, 1]) -> [C]; the attention's 1x1 Conv2d weights -> Dense.
`plan` checks every source tensor is converted or declared unused, exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from checkpoints_convert.mapping import (
    ConversionError,
    Plan,
    Rule,
    Unused,
    convert,
    flatten,
    plan,
    unflatten,
)
from jaxedit.models.qwen_image_vae import QwenImageVAEConfig, abstract_params, decoder_blocks, encoder_blocks

FORMAT = "diffusers"
MANIFEST = "diffusers-qwen-image-vae"  # checkpoints_convert/manifests/<MANIFEST>.json

TIME_TAPS = "a causal conv's earlier time taps meet only the zero padding in front of a single frame"
TIME_CONV = "the resampler's time conv acts only from a video's second chunk on, never on a single frame"

_ALL = slice(None)


def is_qwen_image_vae(keys: Iterable[str]) -> bool:
    """Whether tensor names are an `AutoencoderKLQwenImage`'s (RMS-norm gammas, the fused `to_qkv`)."""
    return any(k.endswith((".gamma", "attentions.0.to_qkv.weight")) and k.startswith("encoder.") for k in keys)


def _causal_conv(src: str, dst: str, kt: int) -> list[Rule | Unused]:
    """A QwenImageCausalConv3d with time kernel kt -> a 2-D conv from its last time tap."""
    rules: list[Rule | Unused] = [
        Rule(f"{src}.weight", f"{dst}/kernel", "conv", src_index=(_ALL, _ALL, kt - 1)),
        Rule(f"{src}.bias", f"{dst}/bias"),
    ]
    if kt > 1:
        rules.append(Unused(f"{src}.weight", (_ALL, _ALL, slice(0, kt - 1)), why=TIME_TAPS))
    return rules


def _conv2d(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", "conv"), Rule(f"{src}.bias", f"{dst}/bias")]


def _norm(src: str, dst: str, images: bool = False) -> list[Rule]:
    """RMS_norm gamma [C, 1, 1, 1] ([C, 1, 1] with images=True) -> [C]."""
    return [Rule(f"{src}.gamma", f"{dst}/gamma", src_index=(_ALL, 0, 0) if images else (_ALL, 0, 0, 0))]


def _residual(src: str, dst: str, c_in: int, c_out: int) -> list[Rule | Unused]:
    rules = _norm(f"{src}.norm1", f"{dst}/norm1") + _causal_conv(f"{src}.conv1", f"{dst}/conv1", 3)
    rules += _norm(f"{src}.norm2", f"{dst}/norm2") + _causal_conv(f"{src}.conv2", f"{dst}/conv2", 3)
    if c_in != c_out:
        rules += _causal_conv(f"{src}.conv_shortcut", f"{dst}/conv_shortcut", 1)
    return rules


def _attention(src: str, dst: str) -> list[Rule]:
    rules = _norm(f"{src}.norm", f"{dst}/norm", images=True)
    for n in ("to_qkv", "proj"):
        rules += [
            Rule(f"{src}.{n}.weight", f"{dst}/{n}/kernel", "conv1x1_linear"),
            Rule(f"{src}.{n}.bias", f"{dst}/{n}/bias"),
        ]
    return rules


def _resample(src: str, dst: str, mode: str) -> list[Rule | Unused]:
    rules: list[Rule | Unused] = _conv2d(f"{src}.resample.1", f"{dst}/resample/1")
    if mode.endswith("3d"):
        rules += [Unused(f"{src}.time_conv.{p}", why=TIME_CONV) for p in ("weight", "bias")]
    return rules


def _mid(src: str, dst: str, c: int) -> list[Rule | Unused]:
    rules = _residual(f"{src}.resnets.0", f"{dst}/resnets/0", c, c)
    rules += _attention(f"{src}.attentions.0", f"{dst}/attentions/0")
    return rules + _residual(f"{src}.resnets.1", f"{dst}/resnets/1", c, c)


def diffusers_rules(cfg: QwenImageVAEConfig) -> list[Rule | Unused]:
    """The key table of an `AutoencoderKLQwenImage` state dict for `QwenImageVAE(cfg)`."""
    rules = _causal_conv("quant_conv", "quant_conv", 1) + _causal_conv("post_quant_conv", "post_quant_conv", 1)

    enc = encoder_blocks(cfg)
    rules += _causal_conv("encoder.conv_in", "encoder/conv_in", 3)
    for k, (kind, c_in, c_out) in enumerate(enc):
        src, dst = f"encoder.down_blocks.{k}", f"encoder/down_blocks/{k}"
        rules += _residual(src, dst, c_in, c_out) if kind == "residual" else _resample(src, dst, kind)
    rules += _mid("encoder.mid_block", "encoder/mid_block", enc[-1][2])
    rules += _norm("encoder.norm_out", "encoder/norm_out") + _causal_conv("encoder.conv_out", "encoder/conv_out", 3)

    dec = decoder_blocks(cfg)
    rules += _causal_conv("decoder.conv_in", "decoder/conv_in", 3)
    rules += _mid("decoder.mid_block", "decoder/mid_block", dec[0][0])
    for i, (c_in, c_out, mode) in enumerate(dec):
        src, dst = f"decoder.up_blocks.{i}", f"decoder/up_blocks/{i}"
        for j in range(cfg.num_res_blocks + 1):
            rules += _residual(f"{src}.resnets.{j}", f"{dst}/resnets/{j}", c_in if j == 0 else c_out, c_out)
        if mode is not None:
            rules += _resample(f"{src}.upsamplers.0", f"{dst}/upsamplers/0", mode)
    rules += _norm("decoder.norm_out", "decoder/norm_out") + _causal_conv("decoder.conv_out", "decoder/conv_out", 3)
    return rules


def target_shapes(cfg: QwenImageVAEConfig) -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of `QwenImageVAE(cfg)` (abstract: nothing allocated)."""
    return {k: tuple(v.shape) for k, v in flatten(abstract_params(cfg)).items()}


def plan_qwen_image_vae(source, cfg: QwenImageVAEConfig) -> Plan:
    """Check a source (`SafetensorsSource`, or `ShapeSource` for a manifest) against `cfg` on names and shapes
    alone; ConversionError naming any unknown, missing or mis-shaped tensor."""
    the_plan = plan(diffusers_rules(cfg), source.shapes, target_shapes(cfg), source_name=source.describe())
    the_plan.fmt = FORMAT
    return the_plan


def load_qwen_image_vae(path: str | Path, cfg: QwenImageVAEConfig, *, dtype: Any = None, place=None) -> dict:
    """An `AutoencoderKLQwenImage` safetensors file or diffusers `vae/` folder -> `QwenImageVAE(cfg)` params.

    dtype: output dtype (default: keep the file's); place(path, host_array): where each finished parameter
    goes (default: jax.device_put). As `checkpoints_convert.load_part` does for the other parts.
    """
    import jax

    from checkpoints_convert.source import SafetensorsSource

    source = SafetensorsSource(path)
    the_plan = plan_qwen_image_vae(source, cfg)
    for key in {r.src for r in the_plan.rules}:
        source.dtype(key)  # ConversionError naming the file for an unsupported dtype
    place = place or (lambda _, a: jax.device_put(a))
    return unflatten(convert(the_plan, source.read, dtype=dtype, source_dtype=source.dtype, place=place))


def read_config(folder: str | Path) -> QwenImageVAEConfig:
    """The `QwenImageVAEConfig` of a diffusers `vae/` folder's config.json."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read the VAE config: {e}") from None
    if config.get("_class_name", "AutoencoderKLQwenImage") != "AutoencoderKLQwenImage":
        raise ConversionError(f"{path}: a {config['_class_name']}, not an AutoencoderKLQwenImage")
    return QwenImageVAEConfig.from_diffusers(config)


def manifest() -> dict:
    """The published Qwen-Image VAE's manifest (tensor names and shapes; `references/qwen_image_vae.py`)."""
    return json.loads(resources.files(__package__).joinpath("manifests", f"{MANIFEST}.json").read_text())


def manifest_shapes() -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the published Qwen-Image VAE."""
    return {k: tuple(v) for k, v in manifest()["tensors"].items()}
