"""The Qwen-Image VAE on single images: `mapping.Unused`, the converter on the published config's tensor names
(derived from diffusers on the meta device), parity with diffusers' AutoencoderKLQwenImage (random weights).

The reference is diffusers' AutoencoderKLQwenImage at a small width with every mode the real one has
(downsample2d/3d, upsample3d/2d, width-changing residual blocks, mid-block attention), every parameter re-drawn
at random, saved with `save_pretrained` and converted with `load_qwen_image_vae`. Inputs: batch 2, 24x40 images
as one-frame videos [B, 3, 1, H, W], as the edit pipelines pass them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from checkpoints_convert import ShapeSource  # noqa: E402
from checkpoints_convert.mapping import ConversionError, Rule, Unused, convert, plan  # noqa: E402
from checkpoints_convert.qwen_image_vae import (  # noqa: E402
    diffusers_rules,
    is_qwen_image_vae,
    load_qwen_image_vae,
    manifest,
    manifest_shapes,
    plan_qwen_image_vae,
    read_config,
    target_shapes,
)
from jaxedit.models.qwen_image_vae import (  # noqa: E402
    QwenImageVAE,
    QwenImageVAEConfig,
    abstract_params,
    denormalize,
    example_inputs,
    normalize,
)
from references import qwen_image_vae as reference  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

_rng = np.random.default_rng(7)
SMALL = QwenImageVAEConfig(
    base_dim=16,
    z_dim=4,
    dim_mult=(1, 2, 2),
    num_res_blocks=1,
    temperal_downsample=(False, True),
    latents_mean=tuple(float(v) for v in _rng.normal(0, 1, 4).round(4)),
    latents_std=tuple(float(v) for v in _rng.uniform(1, 3, 4).round(4)),
)
B, H, W = 2, 24, 40


# ---------------------------------------------------------------------------------------
# mapping.Unused: parts of source tensors dropped on purpose, still covered exactly


def test_unused_declares_dropped_parts_exactly():
    source = {"w": (4, 3, 3), "t": (2,)}
    target = {"k": (4, 3)}
    keep = Rule("w", "k", src_index=(slice(None), slice(None), 2))
    ok = plan(
        [keep, Unused("w", (slice(None), slice(None), slice(0, 2)), why="x"), Unused("t", why="y")], source, target
    )
    assert [r.src for r in ok.rules] == ["w"]  # the unused parts are not rules: convert never reads them

    with pytest.raises(ConversionError, match=r"tensor w: only 12 of 36"):  # the dropped taps undeclared
        plan([keep, Unused("t", why="y")], source, target)
    with pytest.raises(ConversionError, match="model has no place for: t"):
        plan([keep, Unused("w", (slice(None), slice(None), slice(0, 2)), why="x")], source, target)
    with pytest.raises(ConversionError, match="tensor w: written twice"):  # overlaps what a rule reads
        plan([keep, Unused("w", why="x"), Unused("t", why="y")], source, target)
    with pytest.raises(ConversionError, match="missing tensor.* u"):  # declares a tensor the source lacks
        plan(
            [
                keep,
                Unused("w", (slice(None), slice(None), slice(0, 2)), why="x"),
                Unused("t", why="y"),
                Unused("u", why="z"),
            ],
            source,
            target,
        )
    with pytest.raises(ValueError, match="say `why`"):
        Unused("t")

    def read(key, index):
        assert (key, index) == ("w", (slice(None), slice(None), 2)), (key, index)
        return np.arange(36, dtype=np.float32).reshape(4, 3, 3)[index]

    np.testing.assert_array_equal(convert(ok, read)["k"], np.arange(36).reshape(4, 3, 3)[:, :, 2])


# ---------------------------------------------------------------------------------------
# The published checkpoint's names and shapes (no weights)


def test_manifest_is_diffusers_at_the_published_config():
    shipped = manifest()
    assert QwenImageVAEConfig.from_diffusers(shipped["config"]) == QwenImageVAEConfig()
    derived = reference.manifest(QwenImageVAEConfig())  # torch meta device: nothing allocated
    assert derived["tensors"] == shipped["tensors"]
    assert (derived["num_tensors"], derived["num_params"]) == (shipped["num_tensors"], shipped["num_params"])
    assert (shipped["num_tensors"], shipped["num_params"]) == (194, 126_892_531)


def test_published_checkpoint_plans_onto_our_params():
    cfg, shapes = QwenImageVAEConfig(), manifest_shapes()
    assert is_qwen_image_vae(shapes)
    the_plan = plan_qwen_image_vae(ShapeSource(shapes, "qwen-image-vae"), cfg)
    targets = target_shapes(cfg)
    assert set(the_plan.by_target) == set(targets)
    # every source element is converted or declared unused: the dropped ones are the time taps and time convs
    dropped = [r for r in diffusers_rules(cfg) if isinstance(r, Unused)]
    assert sum(".time_conv." in u.src for u in dropped) == 2 * (2 + 2)  # 2 downsample3d + 2 upsample3d
    n_target = sum(int(np.prod(s)) for s in targets.values())
    n_dropped = sum(int(np.prod(shapes[u.src])) * (2 / 3 if u.index else 1) for u in dropped)
    assert n_target + n_dropped == manifest()["num_params"]
    assert n_target == 44_599_603

    bad = {**shapes, "decoder.conv_in.weight": (384, 16, 1, 3, 3)}  # a 2-D kernel where a causal 3x3x3 belongs
    with pytest.raises(ConversionError, match="decoder.conv_in.weight"):
        plan_qwen_image_vae(ShapeSource(bad), cfg)
    with pytest.raises(ConversionError, match="time_conv"):
        plan_qwen_image_vae(ShapeSource(shapes), QwenImageVAEConfig(temperal_downsample=(False, False, True)))


def test_config_checks():
    with pytest.raises(ValueError, match="attn_scales"):
        QwenImageVAEConfig(attn_scales=(1.0,))
    with pytest.raises(ValueError, match="temperal_downsample"):
        QwenImageVAEConfig(temperal_downsample=(True, True))
    with pytest.raises(ValueError, match="z_dim=4"):
        QwenImageVAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="unknown field"):
        QwenImageVAEConfig.from_diffusers({"_class_name": "AutoencoderKLQwenImage", "scaling_factor": 1.0})
    assert QwenImageVAEConfig().downsample == 8 and SMALL.downsample == 4


# ---------------------------------------------------------------------------------------
# Parity with diffusers (random weights)


@functools.cache
def ours():
    m = QwenImageVAE(SMALL)
    encode = jax.jit(lambda p, x: m.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: m.apply({"params": p}, z, method="decode"))
    return encode, decode


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = reference.qwen_image_vae(SMALL)
    path = tmp_path_factory.mktemp("qwen_image_vae")
    model.save_pretrained(path, safe_serialization=True)
    return model, path, load_qwen_image_vae(path, SMALL)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (B, H, W, 3)).astype(np.float32)
    z = rng.standard_normal((B, H // 4, W // 4, SMALL.z_dim)).astype(np.float32)
    return x, z


def frames(a_BHWC):
    """[B, H, W, C] -> a one-frame video [B, C, 1, H, W] (torch)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a_BHWC).transpose(0, 3, 1, 2)))[:, :, None]


def nhwc(t):
    return t[:, :, 0].float().numpy().transpose(0, 2, 3, 1)


def test_converted_tree_and_config(converted):
    _, path, params = converted
    assert read_config(path) == SMALL
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params(SMALL))
    assert got == want
    init = jax.eval_shape(QwenImageVAE(SMALL).init, jax.random.key(0), *example_inputs(SMALL))["params"]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(init)) == want


def test_encode_matches_diffusers(converted, data):
    model, _, params = converted
    with torch.no_grad():
        dist = model.encode(frames(data[0])).latent_dist
    ref = nhwc(dist.mean)
    got = np.asarray(ours()[0](params, data[0]))
    assert got.shape == (B, H // 4, W // 4, SMALL.z_dim)
    err = rel_err(got, ref)
    print(f"encode rel err {err:.2e}")
    assert err <= 1e-5


def test_decode_matches_diffusers(converted, data):
    model, _, params = converted
    with torch.no_grad():
        ref = nhwc(model.decode(frames(data[1])).sample)
    got = np.asarray(ours()[1](params, data[1]))
    assert got.shape == (B, H, W, 3)
    assert np.abs(got).max() <= 1 and np.any(np.abs(ref) == 1)  # the clamp is exercised (on 1 of 5,760 values)
    err = rel_err(got, ref)
    print(f"decode rel err {err:.2e}")
    assert err <= 1e-5


def test_normalize_is_the_pipelines(data):
    """`_encode_vae_image`: (z - mean) / std; before decoding: z / (1 / std) + mean."""
    z = data[1]
    mean = torch.tensor(SMALL.latents_mean).view(1, SMALL.z_dim, 1, 1, 1)
    std = torch.tensor(SMALL.latents_std).view(1, SMALL.z_dim, 1, 1, 1)
    assert rel_err(normalize(SMALL, z), nhwc((frames(z) - mean) / std)) <= 1e-6
    assert rel_err(denormalize(SMALL, z), nhwc(frames(z) / (1.0 / std) + mean)) <= 1e-6
    np.testing.assert_allclose(denormalize(SMALL, normalize(SMALL, z)), z, rtol=1e-5, atol=1e-5)


def test_input_errors(converted):
    params, m = converted[2], QwenImageVAE(SMALL)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        m.apply({"params": params}, jnp.zeros((1, 6, 8, 3)), method="encode")
    with pytest.raises(ValueError, match=r"latents \[B, h, w, 4\]"):
        m.apply({"params": params}, jnp.zeros((1, 2, 2, 16)), method="decode")
    with pytest.raises(ConversionError, match="shape mismatch|no place|missing"):
        load_qwen_image_vae(converted[1], QwenImageVAEConfig(**{**SMALL.__dict__, "base_dim": 8}))


def test_bfloat16_compute_stays_close(converted, data):
    """bfloat16 activations (float32 norms, softmax and outputs) against our float32 run."""
    params, m = converted[2], QwenImageVAE(SMALL, dtype=jnp.bfloat16)
    z = jax.jit(lambda p, x: m.apply({"params": p}, x, method="encode"))(params, data[0])
    x = jax.jit(lambda p, z: m.apply({"params": p}, z, method="decode"))(params, data[1])
    assert z.dtype == x.dtype == jnp.float32
    assert rel_err(z, ours()[0](params, data[0])) < 3e-2
    assert rel_err(x, ours()[1](params, data[1])) < 3e-2
