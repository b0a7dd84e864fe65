"""The FLUX VAE: converter on the real files' manifests, parity with diffusers' AutoencoderKL
(random weights, BFL and diffusers layouts), errors, bfloat16, tiled encode/decode, CLI.

The reference is diffusers' AutoencoderKL with the FLUX configuration at a small width
(channels 16/32/64, same depth as the real model), every parameter re-drawn at random,
saved with `save_pretrained` and converted with `load_vae`. Inputs: batch 3, 48x80 images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from checkpoints_convert import ConversionError, ShapeSource, load_vae, plan_part, shapes_of  # noqa: E402
from checkpoints_convert.__main__ import main as convert_cli  # noqa: E402
from checkpoints_convert.mapping import flatten  # noqa: E402
from checkpoints_convert.published import manifest_shapes, read_manifest  # noqa: E402
from jaxedit import presets  # noqa: E402
from jaxedit.checkpoint import load_params  # noqa: E402
from jaxedit.configs import AutoEncoderConfig  # noqa: E402
from jaxedit.models.autoencoder import AutoEncoder, abstract_params, decode_tiled, encode_tiled, tiled  # noqa: E402
from references.models import autoencoder as reference_model  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

SMALL = AutoEncoderConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=8)
B, H, W = 3, 48, 80
SCALE, SHIFT = SMALL.scale_factor, SMALL.shift_factor


# ---------------------------------------------------------------------------------------
# Full-size manifests (shapes only)


@pytest.mark.parametrize("name", ["bfl-ae", "step1x-ae", "diffusers-flux-vae"])
def test_full_size_manifest_maps_every_tensor(name):
    cfg = presets.get("flux-kontext-dev").vae
    shapes = manifest_shapes(name)
    the_plan = plan_part("vae", ShapeSource(shapes, name), cfg)
    assert the_plan.fmt == ("diffusers" if name.startswith("diffusers") else "bfl")
    # every source tensor used, every target element written exactly once (checked by plan)
    targets = shapes_of(abstract_params(cfg))
    assert set(the_plan.by_target) == set(targets)
    num_params = read_manifest(name)["num_params"]
    n_target = sum(int(np.prod(s)) for s in targets.values())
    assert n_target == sum(int(np.prod(s)) for s in shapes.values()) == num_params == 83_819_683


# ---------------------------------------------------------------------------------------
# Reference model and our jitted functions


@functools.cache
def ours():
    """Jitted functions of AutoEncoder(SMALL), params as an argument, each compiled once:
    encode(p, x); encode_and_sample(p, x, key) -> (encode(x), encode(x, key)) (the program
    `encode` runs); decode(p, z)."""
    m = AutoEncoder(SMALL)
    apply = lambda p, *a: m.apply({"params": p}, *a, method="encode")  # noqa: E731
    encode_and_sample = jax.jit(lambda p, x, key: (apply(p, x), apply(p, x, key)))
    encode = lambda p, x: encode_and_sample(p, x, jax.random.key(0))[0]  # noqa: E731
    decode = jax.jit(lambda p, z: m.apply({"params": p}, z, method="decode"))
    return encode, encode_and_sample, decode


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.float().numpy().transpose(0, 2, 3, 1)


def ref_encode(model, x, dtype=torch.float32):
    """diffusers' latent: (latent_dist.mean - shift) * scale, NHWC, plus the distribution."""
    with torch.no_grad():
        dist = model.to(dtype).encode(nchw(x).to(dtype)).latent_dist
    model.to(torch.float32)
    return (nhwc(dist.mean) - SHIFT) * SCALE, dist


def ref_decode(model, z, dtype=torch.float32):
    with torch.no_grad():
        out = nhwc(model.to(dtype).decode(nchw(np.asarray(z) / SCALE + SHIFT).to(dtype)).sample)
    model.to(torch.float32)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = reference_model(SMALL)
    path = tmp_path_factory.mktemp("vae_diffusers")
    model.save_pretrained(path, safe_serialization=True)
    return model, load_vae(path, SMALL)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (B, H, W, 3)).astype(np.float32)
    z = rng.standard_normal((B, H // 8, W // 8, SMALL.z_channels)).astype(np.float32)
    return x, z


@pytest.fixture(scope="module")
def refs(converted, data):
    """diffusers float32 outputs: latent of x (mean), its distribution, decode of z."""
    model, _ = converted
    z_ref, dist = ref_encode(model, data[0])
    return z_ref, dist, ref_decode(model, data[1])


# ---------------------------------------------------------------------------------------
# float32 parity (diffusers layout)


def test_encode_parity(converted, data, refs):
    _, params = converted
    enc, _, _ = ours()
    z = enc(params, data[0])
    assert z.shape == (B, H // 8, W // 8, 16) and z.dtype == jnp.float32
    err = rel_err(z, refs[0])
    print(f"encode float32 rel err: {err:.2e}")
    assert err <= 1e-5


def test_decode_parity(converted, data, refs):
    _, params = converted
    _, _, dec = ours()
    x = dec(params, data[1])
    assert x.shape == (B, H, W, 3) and x.dtype == jnp.float32
    err = rel_err(x, refs[2])
    print(f"decode float32 rel err: {err:.2e}")
    assert err <= 1e-5


def test_round_trip_parity(converted, data, refs):
    model, params = converted
    enc, _, dec = ours()
    err = rel_err(dec(params, enc(params, data[0])), ref_decode(model, refs[0]))
    print(f"round trip float32 rel err: {err:.2e}")
    assert err <= 1e-5


def test_encode_samples_the_posterior_with_a_key(converted, data, refs):
    """With a key, (z / scale + shift - mean) / std over diffusers' mean and std is N(0, 1) noise."""
    _, params = converted
    dist = refs[1]
    z1, z1b, z2 = (np.asarray(ours()[1](params, data[0], jax.random.key(k))[1]) for k in (7, 7, 8))
    eps = (z1 / SCALE + SHIFT - nhwc(dist.mean)) / nhwc(dist.std)
    n = eps.size
    assert abs(eps.mean()) < 4 / np.sqrt(n) and abs(eps.std() - 1) < 0.05, (eps.mean(), eps.std())
    np.testing.assert_array_equal(z1, z1b)
    assert rel_err(z2, z1) > 1e-3


# ---------------------------------------------------------------------------------------
# BFL layout, checked against diffusers' own BFL -> diffusers key conversion


def random_bfl_state_dict(cfg: AutoEncoderConfig, seed: int = 2) -> dict[str, np.ndarray]:
    """The real BFL file's key set (bfl-ae.json) with channel widths scaled to `cfg`, random values
    drawn like `randomize_`: conv N(0, 1/fan_in), norm weights 1 + U(-0.5, 0.5), biases N(0, 0.1)."""
    full = presets.get("flux-kontext-dev").vae
    assert cfg.ch_mult == full.ch_mult and cfg.num_res_blocks == full.num_res_blocks
    dims = {full.ch * m: cfg.ch * m for m in full.ch_mult} | {2 * full.z_channels: 2 * cfg.z_channels}
    dims |= {full.z_channels: cfg.z_channels, 3: 3, 1: 1}
    rng = np.random.default_rng(seed)
    tensors = {}
    for k, shape in manifest_shapes("bfl-ae").items():
        shape = [dims[d] for d in shape]
        if len(shape) > 1:
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif "norm" in k and k.endswith("weight"):
            a = 1 + rng.uniform(-0.5, 0.5, shape)
        else:
            a = 0.1 * rng.standard_normal(shape)
        tensors[k] = a.astype(np.float32)
    return tensors


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae_bfl") / "ae.safetensors"
    tensors = random_bfl_state_dict(SMALL)
    save_file(tensors, str(path))
    return path, tensors


def test_bfl_layout_matches_diffusers_key_conversion(converted, bfl_file, data, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model, _ = converted
    path, tensors = bfl_file
    ref = diffusers.AutoencoderKL.from_config(model.config).eval()
    state = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in tensors.items()}, ref.config)
    ref.load_state_dict(state, strict=True)

    params = load_vae(path, SMALL)
    enc, _, dec = ours()
    errs = {
        "encode": rel_err(enc(params, data[0]), ref_encode(ref, data[0])[0]),
        "decode": rel_err(dec(params, data[1]), ref_decode(ref, data[1])),
    }
    print("BFL layout float32 rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= 1e-5
    # and parameter by parameter: the BFL file and diffusers' conversion of it load identically
    ref.save_pretrained(tmp_path, safe_serialization=True)
    via_diffusers = flatten(load_vae(tmp_path, SMALL))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(via_diffusers[k]), err_msg=k)


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("size", [(44, 80), (48, 84)])
def test_size_not_multiple_of_8_is_named(converted, size):
    _, params = converted
    x = np.zeros((1, *size, 3), np.float32)
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        AutoEncoder(SMALL).apply({"params": params}, x, method="encode")


def test_unknown_missing_and_misshaped_keys_are_named(bfl_file, tmp_path):
    _, tensors = bfl_file
    cases = {
        "extra": ({**tensors, "quant_conv.weight": np.zeros((32, 32, 1, 1), np.float32)}, r"quant_conv\.weight"),
        "missing": (
            {k: v for k, v in tensors.items() if k != "decoder.up.2.upsample.conv.bias"},
            r"decoder\.up\.2\.upsample\.conv\.bias",
        ),
        "shape": (
            {**tensors, "encoder.mid.attn_1.q.weight": np.zeros((64, 64, 3, 3), np.float32)},
            r"encoder\.mid\.attn_1\.q\.weight",
        ),
    }
    for name, (t, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(t, str(path))
        with pytest.raises(ConversionError, match=pattern) as e:
            load_vae(path, SMALL)
        assert path.name in str(e.value)
    # an explicit opt-out skips the extra tensor
    params = load_vae(tmp_path / "extra.safetensors", SMALL, ignore=lambda k: k.startswith("quant_conv"))
    assert params["decoder"]["conv_in"]["kernel"].shape == (3, 3, 16, 64)


# ---------------------------------------------------------------------------------------
# bfloat16


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """The `flux-kontext-tiny` VAE: a random diffusers model saved as a folder, and its conversion."""
    cfg = presets.get("flux-kontext-tiny").vae
    model = reference_model(cfg, seed=5)
    src = tmp_path_factory.mktemp("vae_tiny") / "vae"
    model.save_pretrained(src, safe_serialization=True)
    return cfg, model, src, load_vae(src, cfg)


def test_bfloat16_close_to_float32_reference(tiny_preset, data):
    """bfloat16 compute (float32 GroupNorm statistics) stays within twice diffusers' own bfloat16
    error. On the tiny preset: XLA compiles bfloat16 convolutions slowly on CPU."""
    cfg, model, _, params = tiny_preset
    m = AutoEncoder(cfg, dtype=jnp.bfloat16)
    p16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    x, z = data[0][:1], data[1][:1]  # one sample: torch's bfloat16 convolutions are slow on CPU
    report = []
    for name, ours16, ref32, ref16 in [
        (
            "encode",
            jax.jit(functools.partial(m.apply, method="encode"))({"params": p16}, x),
            ref_encode(model, x)[0],
            ref_encode(model, x, torch.bfloat16)[0],
        ),
        (
            "decode",
            jax.jit(functools.partial(m.apply, method="decode"))({"params": p16}, z),
            ref_decode(model, z),
            ref_decode(model, z, torch.bfloat16),
        ),
    ]:
        assert ours16.dtype == jnp.float32
        err_ours, err_ref = rel_err(ours16, ref32), rel_err(ref16, ref32)
        report.append(f"{name}: ours {err_ours:.2e}, diffusers {err_ref:.2e}")
        assert 0 < err_ref and err_ours <= 2 * err_ref
    print("bfloat16 rel err vs float32 diffusers: " + "; ".join(report))


# ---------------------------------------------------------------------------------------
# Tiled encode / decode


@pytest.mark.parametrize("up,down", [(8, 1), (1, 8)])
def test_tiling_bookkeeping_is_exact_for_a_local_function(up, down):
    """A per-cell function (no spatial context) tiled with overlaps gives exactly its untiled output."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 13 * down, 21 * down, 4)), jnp.float32)

    def local(t):  # a per-cell map that changes the resolution like the decoder / encoder
        b, h, w, c = t.shape
        t = jnp.tanh(t) * 2 + 1
        if up > 1:
            return jnp.repeat(jnp.repeat(t, up, 1), up, 2)
        return t.reshape(b, h // down, down, w // down, down, c).mean((2, 4))

    tile, overlap = 8 * down, 3 * down
    out_tiled = jax.jit(lambda x: tiled(local, x, tile, overlap, up, down))(x)
    np.testing.assert_allclose(out_tiled, local(x), rtol=1e-6, atol=1e-6)


def test_decode_tiled_follows_the_vae_downsampling():
    """A VAE that downsamples by 4 (the shipped default model's) decodes tiles to 4x their latent size."""
    cfg = presets.get("flux-kontext-shapes").vae
    assert cfg.downsample == 4
    m, params = AutoEncoder(cfg), abstract_params(cfg)
    z = jax.ShapeDtypeStruct((1, 12, 20, cfg.z_channels), jnp.float32)
    full = jax.eval_shape(lambda p, z: m.apply({"params": p}, z, method="decode"), params, z)
    out = jax.eval_shape(functools.partial(decode_tiled, m, tile=8, overlap=4), params, z)  # 2 x 4 tiles
    assert out.shape == full.shape == (1, 48, 80, 3)


def test_one_tile_is_the_untiled_program(converted, data):
    """When one tile covers the input, the tiled functions trace to exactly encode / decode."""
    _, params = converted
    m = AutoEncoder(SMALL)
    x, z = data
    same = lambda f, g, *a: str(jax.make_jaxpr(f)(*a)) == str(jax.make_jaxpr(g)(*a))  # noqa: E731
    assert same(
        lambda p, z: decode_tiled(m, p, z, tile=10, overlap=4),
        lambda p, z: m.apply({"params": p}, z, method="decode"),
        params,
        z,
    )
    assert same(
        lambda p, x: encode_tiled(m, p, x, tile=80, overlap=32),
        lambda p, x: m.apply({"params": p}, x, method="encode"),
        params,
        x,
    )


# Random weights give every tile very different statistics, so tiling costs far more here
# than with trained weights. Stated tolerance: 0.3 (measured 0.25 decode, 0.27 encode), and
# never worse than diffusers' own tiling (`enable_tiling`) at the same tile size and overlap.
TILED_TOL = 0.3


def _diffusers_tiled(model, fn, tile_latents: int, overlap_latents: int):
    model.enable_tiling()
    model.tile_latent_min_size, model.tile_sample_min_size = tile_latents, 8 * tile_latents
    model.tile_overlap_factor = overlap_latents / tile_latents
    try:
        return fn()
    finally:
        model.disable_tiling()


def test_decode_tiled(converted, data, refs):
    model, params = converted
    z = data[1][:1]  # 6x10 latents, tiles of 6 with overlap 2: 1 x 2 tiles
    full = refs[2][:1]  # untiled decode (diffusers; ours matches it to 1e-6)
    tiled = jax.jit(functools.partial(decode_tiled, AutoEncoder(SMALL), tile=6, overlap=2))(params, z)
    err = rel_err(tiled, full)
    err_dif = rel_err(_diffusers_tiled(model, lambda: ref_decode(model, z), 6, 2), full)
    print(f"decode_tiled (tile 6, overlap 2 on 6x10 latents) rel err: ours {err:.3f}, diffusers {err_dif:.3f}")
    assert tiled.shape == full.shape and err <= TILED_TOL and err <= err_dif


def test_encode_tiled(converted, data, refs):
    model, params = converted
    x = data[0][:1]  # 48x80 pixels, tiles of 48 with overlap 16: 1 x 2 tiles
    full = refs[0][:1]  # untiled encode (diffusers; ours matches it to 1e-6)
    tiled = jax.jit(functools.partial(encode_tiled, AutoEncoder(SMALL), tile=48, overlap=16))(params, x)
    err = rel_err(tiled, full)
    err_dif = rel_err(_diffusers_tiled(model, lambda: ref_encode(model, x)[0], 6, 2), full)
    print(f"encode_tiled (tile 48, overlap 16 px on 48x80) rel err: ours {err:.3f}, diffusers {err_dif:.3f}")
    assert tiled.shape == full.shape and err <= TILED_TOL and err <= err_dif


# ---------------------------------------------------------------------------------------
# CLI


def test_cli_converts_a_diffusers_folder_of_the_tiny_preset(tiny_preset, tmp_path):
    cfg, _, src, direct = tiny_preset
    dst = tmp_path / "orbax"
    assert convert_cli(["vae", str(src), str(dst), "--preset", "flux-kontext-tiny"]) == 0
    restored, direct = flatten(load_params(dst)), flatten(direct)
    assert set(restored) == set(direct) == set(shapes_of(abstract_params(cfg)))
    assert "decoder/up/0/block/0/nin_shortcut/kernel" in direct  # 64 -> 32 channels in this preset
    for k in direct:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(direct[k]), err_msg=k)
