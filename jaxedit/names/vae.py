"""Name tables of the FLUX VAE: BFL layout (`ae.safetensors`, Step1X-Edit `vae.safetensors`)
and diffusers `AutoencoderKL` layout -> jaxedit `AutoEncoder`.

Our parameter tree follows BFL's module names, so the BFL table is the identity on names.
diffusers renames (loaders/single_file_utils.py convert_ldm_vae_checkpoint): down.i.block.j ->
down_blocks.i.resnets.j, nin_shortcut -> conv_shortcut, downsample/upsample -> *samplers.0,
mid.block_{1,2} -> mid_block.resnets.{0,1}, mid.attn_1.{norm,q,k,v,proj_out} ->
mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0} (Linear weights instead of 1x1
convs), norm_out -> conv_norm_out, and decoder.up.k -> decoder.up_blocks.(n-1-k).
"""

from __future__ import annotations

from jaxedit.configs import AutoEncoderConfig
from jaxedit.names import Rule, copy, linear


def _conv(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", "conv"), Rule(f"{src}.bias", f"{dst}/bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return copy(f"{src}.weight", f"{dst}/scale") + copy(f"{src}.bias", f"{dst}/bias")


def _resnet(src: str, dst: str, c_in: int, c_out: int, fmt: str) -> list[Rule]:
    rules = _norm(f"{src}.norm1", f"{dst}/norm1") + _conv(f"{src}.conv1", f"{dst}/conv1")
    rules += _norm(f"{src}.norm2", f"{dst}/norm2") + _conv(f"{src}.conv2", f"{dst}/conv2")
    if c_in != c_out:
        rules += _conv(f"{src}.{'nin_shortcut' if fmt == 'bfl' else 'conv_shortcut'}", f"{dst}/nin_shortcut")
    return rules


def _mid(src: str, dst: str, c: int, fmt: str) -> list[Rule]:
    if fmt == "bfl":
        rules = _resnet(f"{src}.block_1", f"{dst}/block_1", c, c, fmt)
        rules += _resnet(f"{src}.block_2", f"{dst}/block_2", c, c, fmt)
        rules += _norm(f"{src}.attn_1.norm", f"{dst}/attn_1/norm")
        for n in ("q", "k", "v", "proj_out"):
            rules += [
                Rule(f"{src}.attn_1.{n}.weight", f"{dst}/attn_1/{n}/kernel", "conv1x1_linear"),
                Rule(f"{src}.attn_1.{n}.bias", f"{dst}/attn_1/{n}/bias"),
            ]
        return rules
    rules = _resnet(f"{src}_block.resnets.0", f"{dst}/block_1", c, c, fmt)
    rules += _resnet(f"{src}_block.resnets.1", f"{dst}/block_2", c, c, fmt)
    attn = f"{src}_block.attentions.0"
    rules += _norm(f"{attn}.group_norm", f"{dst}/attn_1/norm")
    for theirs, ours in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        rules += linear(f"{attn}.{theirs}", f"{dst}/attn_1/{ours}")
    return rules


def _rules(cfg: AutoEncoderConfig, fmt: str) -> list[Rule]:
    bfl = fmt == "bfl"
    n, widths = len(cfg.ch_mult), [cfg.ch * m for m in cfg.ch_mult]
    rules: list[Rule] = []
    for part in ("encoder", "decoder"):
        rules += _conv(f"{part}.conv_in", f"{part}/conv_in")
        rules += _norm(f"{part}.{'norm_out' if bfl else 'conv_norm_out'}", f"{part}/norm_out")
        rules += _conv(f"{part}.conv_out", f"{part}/conv_out")
        rules += _mid(f"{part}.mid", f"{part}/mid", widths[-1], fmt)

    c = cfg.ch
    for i in range(n):  # encoder: levels 0 .. n-1, downsample after all but the last
        src = f"encoder.down.{i}" if bfl else f"encoder.down_blocks.{i}"
        for j in range(cfg.num_res_blocks):
            blk = f"{src}.block.{j}" if bfl else f"{src}.resnets.{j}"
            rules += _resnet(blk, f"encoder/down/{i}/block/{j}", c, widths[i], fmt)
            c = widths[i]
        if i < n - 1:
            down = f"{src}.downsample.conv" if bfl else f"{src}.downsamplers.0.conv"
            rules += _conv(down, f"encoder/down/{i}/downsample/conv")

    c = widths[-1]
    for i in reversed(range(n)):  # decoder: levels n-1 .. 0, upsample after all but level 0
        src = f"decoder.up.{i}" if bfl else f"decoder.up_blocks.{n - 1 - i}"
        for j in range(cfg.num_res_blocks + 1):
            blk = f"{src}.block.{j}" if bfl else f"{src}.resnets.{j}"
            rules += _resnet(blk, f"decoder/up/{i}/block/{j}", c, widths[i], fmt)
            c = widths[i]
        if i > 0:
            up = f"{src}.upsample.conv" if bfl else f"{src}.upsamplers.0.conv"
            rules += _conv(up, f"decoder/up/{i}/upsample/conv")
    return rules


def bfl_rules(cfg: AutoEncoderConfig) -> list[Rule]:
    """BFL `ae.safetensors` (also Step1X-Edit's `vae.safetensors`) -> `AutoEncoder(cfg)` params."""
    return _rules(cfg, "bfl")


def diffusers_rules(cfg: AutoEncoderConfig) -> list[Rule]:
    """diffusers `AutoencoderKL` -> `AutoEncoder(cfg)` params."""
    return _rules(cfg, "diffusers")


# layout name -> its table
LAYOUTS = {"bfl": bfl_rules, "diffusers": diffusers_rules}
