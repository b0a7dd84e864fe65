"""Parity of jaxedit's QwenImageTransformer against diffusers' QwenImageTransformer2DModel (random weights).

Every reference parameter is re-drawn at random, the model is saved with `save_pretrained` (safetensors)
and converted with our converter; outputs are compared in float32 on an edit-style input: batch 3, 7 text
tokens with a mask that drops tokens of two samples (a padded tail, a hole), a non-square 3x5 target grid
and one or two reference grids of other sizes (4x3, 2x2), for Qwen-Image-Edit-2509 (zero_cond_t off) and
2511 (on: reference tokens modulated with timestep 0).
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

from checkpoints_convert import ConversionError, ShapeSource  # noqa: E402
from checkpoints_convert.qwen_image import load_qwen_image_transformer, plan_transformer  # noqa: E402
from jaxedit.models import qwen_image_rope  # noqa: E402
from jaxedit.models.qwen_image import (  # noqa: E402
    EDIT_2511,
    QwenImageConfig,
    QwenImageTransformer,
    abstract_params,
)
from jaxedit.parallel.sharding import DEFAULT_RULES  # noqa: E402
from references.qwen_image import qwen_image_transformer as reference_model  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

B, LT = 3, 7
TARGET, REF1, REF2 = (1, 3, 5), (1, 4, 3), (1, 2, 2)
LAYOUTS = {"one_ref": (TARGET, REF1), "two_refs": (TARGET, REF1, REF2)}


def make_inputs(cfg: QwenImageConfig, img_shapes, seed=1, masked=True):
    rng = np.random.default_rng(seed)
    li = sum(f * h * w for f, h, w in img_shapes)
    mask = np.ones((B, LT), np.int64)
    mask[1, 5:] = 0  # padded tail
    mask[2, 2] = 0  # a hole: the mask is applied element-wise
    return dict(
        img=rng.standard_normal((B, li, cfg.in_channels)).astype(np.float32),
        txt=rng.standard_normal((B, LT, cfg.joint_attention_dim)).astype(np.float32),
        mask=mask if masked else None,
        timesteps=np.array([0.3, 0.75, 1.0], np.float32),
        img_shapes=img_shapes,
    )


def run_reference(model, x, dtype=torch.float32):
    t = lambda a: torch.from_numpy(np.asarray(a)).to(dtype)  # noqa: E731
    with torch.no_grad():
        out = model.to(dtype)(
            hidden_states=t(x["img"]),
            encoder_hidden_states=t(x["txt"]),
            encoder_hidden_states_mask=None if x["mask"] is None else torch.from_numpy(x["mask"]),
            timestep=t(x["timesteps"]),
            img_shapes=[list(x["img_shapes"])] * B,
            return_dict=False,
        )[0]
    model.to(torch.float32)
    return out.float().numpy()


def run_ours(params, cfg, x, *, dtype=jnp.float32, scan_layers=True):
    model = QwenImageTransformer(cfg, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    mask = None if x["mask"] is None else jnp.asarray(x["mask"], jnp.int32)
    fn = jax.jit(functools.partial(model.apply, img_shapes=x["img_shapes"]))
    out = fn({"params": params}, jnp.asarray(x["img"], dtype), jnp.asarray(x["txt"], dtype), mask, x["timesteps"])
    return np.asarray(out.astype(jnp.float32))


@pytest.fixture(scope="module", params=[False, True], ids=["2509", "2511"])
def converted(request, tmp_path_factory):
    cfg = QwenImageConfig.tiny(zero_cond_t=request.param)
    model = reference_model(cfg)
    path = tmp_path_factory.mktemp("qwen_image_diffusers")
    model.save_pretrained(path, safe_serialization=True)
    return cfg, model, load_qwen_image_transformer(path, cfg)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float32_parity(converted, layout):
    cfg, model, params = converted
    x = make_inputs(cfg, LAYOUTS[layout])
    ref = run_reference(model, x)
    err = rel_err(run_ours(params, cfg, x), ref)
    print(f"float32 rel err zero_cond_t={cfg.zero_cond_t} {layout}: {err:.2e}")
    assert err <= 1e-5


def test_float32_parity_without_mask(converted):
    """No mask (every text token valid): parity, and the masked run of the same input differs (the mask acts)."""
    cfg, model, params = converted
    x = make_inputs(cfg, LAYOUTS["two_refs"], masked=False)
    ours = run_ours(params, cfg, x)
    err = rel_err(ours, run_reference(model, x))
    print(f"float32 rel err zero_cond_t={cfg.zero_cond_t} two_refs, no mask: {err:.2e}")
    assert err <= 1e-5
    assert rel_err(run_ours(params, cfg, {**x, "mask": make_inputs(cfg, LAYOUTS["two_refs"])["mask"]}), ours) > 1e-3


def test_scan_and_loop_agree(converted):
    """The same stacked parameters through `nn.scan` or the unrolled loop: the same output."""
    cfg, model, params = converted
    x = make_inputs(cfg, LAYOUTS["two_refs"])
    scan, loop = run_ours(params, cfg, x), run_ours(params, cfg, x, scan_layers=False)
    print(f"scan vs loop rel diff zero_cond_t={cfg.zero_cond_t}: {rel_err(loop, scan):.2e}")
    assert rel_err(loop, scan) <= 1e-6
    assert rel_err(loop, run_reference(model, x)) <= 1e-5


def test_bfloat16_within_twice_reference_error(converted):
    cfg, model, params = converted
    x = make_inputs(cfg, LAYOUTS["two_refs"])
    ref32 = run_reference(model, x)
    ref16 = run_reference(model, x, torch.bfloat16)
    ours16 = run_ours(params, cfg, x, dtype=jnp.bfloat16)
    err_ref, err_ours = rel_err(ref16, ref32), rel_err(ours16, ref32)
    print(f"bfloat16 rel err vs float32 reference zero_cond_t={cfg.zero_cond_t}: {err_ref=:.3e}, {err_ours=:.3e}")
    assert err_ref > 0
    assert err_ours <= 2 * err_ref


def test_zero_cond_t_changes_the_output(converted):
    """The same weights with the other zero_cond_t give another output: the two parity cases test two
    computations (2511's timestep-0 modulation of the reference tokens is not a no-op here)."""
    cfg, _, params = converted
    x = make_inputs(cfg, LAYOUTS["one_ref"])
    other = QwenImageConfig.tiny(zero_cond_t=not cfg.zero_cond_t)
    assert rel_err(run_ours(params, other, x), run_ours(params, cfg, x)) > 1e-3


def test_rope_tables_match_diffusers():
    """Our [text | image] cos / sin against diffusers' QwenEmbedRope at the published axes (16, 56, 56) for a
    large target and two references (positions up to 1,100), and at the tiny model's (4, 6, 6)."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    cases = [((16, 56, 56), ((1, 128, 128), (1, 40, 52), (1, 33, 17)), 1024), ((4, 6, 6), LAYOUTS["two_refs"], LT)]
    for axes, img_shapes, lt in cases:
        img_freqs, txt_freqs = QwenEmbedRope(10000, list(axes), scale_rope=True)([list(img_shapes)], max_txt_seq_len=lt)
        want = torch.cat([txt_freqs, img_freqs]).numpy()
        cos, sin = qwen_image_rope.rope_frequencies(qwen_image_rope.positions(img_shapes, lt), axes, 10000)
        assert cos.shape == (1, want.shape[0], sum(axes) // 2)
        np.testing.assert_allclose(np.asarray(cos[0]), want.real, rtol=0, atol=1e-7)
        np.testing.assert_allclose(np.asarray(sin[0]), want.imag, rtol=0, atol=1e-7)


def test_torch_omega_table():
    """TORCH_OMEGA_BITS are the installed torch's float32 rotation frequencies, bit for bit."""
    for d, theta in qwen_image_rope.TORCH_OMEGA_BITS:
        want = (1.0 / torch.pow(theta, torch.arange(0, d, 2).to(torch.float32).div(d))).numpy()
        np.testing.assert_array_equal(qwen_image_rope.omega((d,), theta), want)


def test_full_size_table_plans():
    """The table covers the published 60-layer DiT exactly (names and shapes of diffusers' own module, built
    without memory); a missing or an extra tensor is named."""
    with torch.device("meta"):
        model = diffusers.QwenImageTransformer2DModel(zero_cond_t=True)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(plan_transformer(ShapeSource(shapes), EDIT_2511).rules) == len(shapes)
    missing = {k: v for k, v in shapes.items() if k != "transformer_blocks.59.attn.norm_added_k.weight"}
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) transformer_blocks.59.attn.norm_added_k.weight"):
        plan_transformer(ShapeSource(missing), EDIT_2511)
    with pytest.raises(ConversionError, match="time_text_embed.addition_t_embedding.weight"):
        plan_transformer(ShapeSource({**shapes, "time_text_embed.addition_t_embedding.weight": (2, 3072)}), EDIT_2511)


def test_config_from_diffusers():
    model_cfg = reference_model(QwenImageConfig.tiny(zero_cond_t=True)).config
    assert QwenImageConfig.from_diffusers(dict(model_cfg)) == QwenImageConfig.tiny(zero_cond_t=True)
    assert QwenImageConfig.from_diffusers({"_class_name": "QwenImageTransformer2DModel"}) == QwenImageConfig()
    with pytest.raises(ValueError, match="use_layer3d_rope"):
        QwenImageConfig.from_diffusers({"use_layer3d_rope": True})
    with pytest.raises(ValueError, match="unknown config keys"):
        QwenImageConfig.from_diffusers({"num_single_layers": 38})


def test_logical_axes_are_in_the_rule_table():
    """Every parameter axis carries a logical name the one sharding rule table knows."""
    specs = nn.get_partition_spec(abstract_params(QwenImageConfig.tiny(), boxed=True))
    names = {n for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
             for n in spec}  # fmt: skip
    assert None not in names
    assert names <= {rule for rule, _ in DEFAULT_RULES}


def test_sharded_forward_matches_unsharded(converted):
    """On a 2 x 3 mesh (fsdp=2 splitting the batch and the model width, tensor=3 the heads and MLP, 6 fake CPU
    devices) under the one rule table: the unsharded output."""
    from jaxedit.parallel import sharding as sh

    cfg, _, params = converted
    x = make_inputs(cfg, LAYOUTS["two_refs"])
    args = [x["img"][:2], x["txt"][:2], x["mask"][:2].astype(np.int32), x["timesteps"][:2]]
    model = QwenImageTransformer(cfg)
    fn = jax.jit(functools.partial(model.apply, img_shapes=x["img_shapes"]))
    want = fn({"params": params}, *args)
    mesh = sh.make_mesh(sh.MeshConfig.parse("fsdp=2,tensor=3"), jax.devices()[:6])
    params_s = jax.device_put(params, sh.shardings(abstract_params(cfg, boxed=True), mesh))
    with sh.activate(mesh):
        out = fn({"params": params_s}, *[jax.device_put(a, sh.batch_sharding(mesh, a.ndim)) for a in args])
    assert out.sharding.is_equivalent_to(sh.batch_sharding(mesh, 3), 3)
    assert params_s["transformer_blocks"]["attn"]["to_q"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor")
    assert rel_err(out, want) <= 1e-6


def test_remat_token_chunks_and_attention_impl_are_the_same_computation(converted):
    """remat, MLPs on token slices and the chunked (masked by segment ids) attention: the same output."""
    cfg, _, params = converted
    x = make_inputs(cfg, LAYOUTS["two_refs"])
    args = [x["img"], x["txt"], x["mask"].astype(np.int32), x["timesteps"]]
    outs = [
        jax.jit(functools.partial(model.apply, img_shapes=x["img_shapes"]))({"params": params}, *args)
        for model in (
            QwenImageTransformer(cfg, attention_impl="xla"),
            QwenImageTransformer(cfg, remat_policy="dots", mlp_chunks=3, attention_impl="chunked"),
        )
    ]
    assert rel_err(outs[1], outs[0]) <= 1e-6
