"""Converter: full-size manifests on abstract shapes, strictness, CLI round trip."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from checkpoints_convert import ConversionError, ShapeSource, load_transformer, plan_part
from checkpoints_convert.__main__ import main as convert_cli
from checkpoints_convert.mapping import flatten
from checkpoints_convert.published import manifest_shapes
from jaxedit import presets
from jaxedit.checkpoint import load_params
from jaxedit.models.flux import abstract_params


@pytest.mark.parametrize(
    "name,prefix",
    [
        ("bfl-flux1-kontext-dev", ""),
        ("bfl-flux1-kontext-dev", "model.diffusion_model."),  # ComfyUI-style wrapper prefix
        ("diffusers-flux-transformer", ""),
    ],
)
def test_full_size_manifest_maps_every_tensor(name, prefix):
    cfg = presets.get("flux-kontext-dev").transformer
    shapes = {prefix + k: v for k, v in manifest_shapes(name).items()}
    source = ShapeSource(shapes, name)
    the_plan = plan_part("transformer", source, cfg)
    assert the_plan.fmt == ("bfl" if name.startswith("bfl") else "diffusers")
    assert set(source.shapes) == set(manifest_shapes(name))  # the wrapper prefix was recognised and dropped
    # every source tensor used, every target element written exactly once (checked by plan);
    # and the totals agree: 11.9B parameters on both sides.
    targets = flatten(abstract_params(cfg))
    assert set(the_plan.by_target) == set(targets)
    n_target = sum(int(np.prod(v.shape)) for v in targets.values())
    assert n_target == sum(int(np.prod(s)) for s in shapes.values()) == 11_901_408_320


def test_flux_dev_manifest_needs_guidance_in_config():
    """FLUX.1 [dev] and Kontext share the tree; a config without guidance_in rejects the tensors by name."""
    cfg = presets.get("flux-kontext-dev").transformer
    import dataclasses

    no_guidance = dataclasses.replace(cfg, guidance_embed=False)
    with pytest.raises(ConversionError, match="guidance_in.in_layer.weight"):
        plan_part("transformer", ShapeSource(manifest_shapes("bfl-flux1-kontext-dev")), no_guidance)


def tiny_bfl_file(tmp_path, cfg, extra=None, drop=None, reshape=None):
    """A random BFL-layout file for a small `cfg`: the real file's key set (from the full-size
    manifest, blocks beyond cfg's depth dropped) with every dimension scaled down."""
    import re

    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    dims = {
        3072: h,
        12288: m,
        9216: 3 * h,
        18432: 6 * h,
        21504: 3 * h + m,
        15360: h + m,
        6144: 2 * h,
        128: cfg.head_dim,
        4096: cfg.context_in_dim,
        768: cfg.vec_in_dim,
        64: cfg.in_channels,
        256: 256,
    }
    rng = np.random.default_rng(0)
    tensors = {}
    for k, shape in manifest_shapes("bfl-flux1-kontext-dev").items():
        blk = re.match(r"(double|single)_blocks\.(\d+)\.", k)
        if blk and int(blk.group(2)) >= (cfg.depth if blk.group(1) == "double" else cfg.depth_single_blocks):
            continue
        tensors[k] = rng.standard_normal([dims[d] for d in shape]).astype(np.float32)
    tensors.update(extra or {})
    for k in drop or []:
        del tensors[k]
    for k, s in (reshape or {}).items():
        tensors[k] = np.zeros(s, np.float32)
    path = tmp_path / "flux.safetensors"
    save_file(tensors, str(path))
    return path


TINY = presets.get("flux-kontext-tiny").transformer


def test_unknown_key_is_named(tmp_path):
    path = tiny_bfl_file(tmp_path, TINY, extra={"double_blocks.0.lora_down.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match=r"double_blocks\.0\.lora_down\.weight") as e:
        load_transformer(path, TINY)
    assert "flux.safetensors" in str(e.value)
    # an explicit opt-out skips it
    params = load_transformer(path, TINY, ignore=lambda k: "lora" in k)
    assert params["img_in"]["kernel"].shape == (64, TINY.hidden_size)


def test_missing_tensor_is_named(tmp_path):
    path = tiny_bfl_file(tmp_path, TINY, drop=["single_blocks.1.norm.key_norm.scale"])
    with pytest.raises(ConversionError, match=r"single_blocks\.1\.norm\.key_norm\.scale"):
        load_transformer(path, TINY)


def test_shape_mismatch_is_named(tmp_path):
    path = tiny_bfl_file(tmp_path, TINY, reshape={"double_blocks.1.txt_attn.proj.weight": (TINY.hidden_size, 7)})
    with pytest.raises(
        ConversionError,
        match=r"shape mismatch for double_blocks\.1\.txt_attn\.proj\.weight",
    ):
        load_transformer(path, TINY)


def test_sharded_index_and_cli_round_trip(tmp_path):
    """A two-shard checkpoint with its index converts through the CLI to Orbax and reads back equal."""
    single = tiny_bfl_file(tmp_path, TINY)
    from safetensors.numpy import load_file

    tensors = load_file(str(single))
    keys = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    weight_map = {}
    for i, part in enumerate([keys[::2], keys[1::2]]):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(shard_dir / name))
        weight_map.update({k: name for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    dst = tmp_path / "orbax"
    assert (
        convert_cli(["transformer", str(shard_dir), str(dst), "--preset", "flux-kontext-tiny", "--dtype", "bfloat16"])
        == 0
    )
    restored = load_params(dst)
    direct = load_transformer(single, TINY, dtype=np.float32)
    flat_r, flat_d = flatten(restored), flatten(direct)
    assert set(flat_r) == set(flat_d)
    for k in flat_d:
        assert flat_r[k].dtype == np.dtype("bfloat16")
        np.testing.assert_array_equal(
            np.asarray(flat_r[k], np.float32), np.asarray(flat_d[k]).astype("bfloat16").astype(np.float32)
        )
    # qkv really is split from the fused BFL weight: q of layer 1 equals rows [0:h] transposed
    h = TINY.hidden_size
    np.testing.assert_array_equal(
        np.asarray(flat_d["double_blocks/img_attn/qkv/kernel"])[1, :, 0, :],
        tensors["double_blocks.1.img_attn.qkv.weight"][:h].T,
    )


def test_cli_reports_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not safetensors")
    assert convert_cli(["transformer", str(bad), str(tmp_path / "out"), "--preset", "flux-kontext-tiny"]) == 2
    assert "model.bin" in capsys.readouterr().err


def test_jit_forward_of_converted_params(tmp_path):
    """Converted params are exactly the pytree Flux(cfg).init gives."""
    path = tiny_bfl_file(tmp_path, TINY)
    params = load_transformer(path, TINY)
    abstract = abstract_params(TINY)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
        assert p.shape == a.shape
