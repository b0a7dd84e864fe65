"""Parity of jaxedit's Flux against diffusers' FluxTransformer2DModel (random weights).

Every reference parameter is re-drawn at random, the model is saved with
`save_pretrained` (safetensors) and converted with our converter; outputs are compared
on a Kontext-style input: batch 3, 7 text tokens, a non-square 3x5 target grid and a
4x3 reference grid whose ids have first coordinate 1, guidance on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from checkpoints_convert import load_transformer  # noqa: E402
from jaxedit import presets  # noqa: E402
from jaxedit.configs import FluxConfig  # noqa: E402
from jaxedit.models import Flux  # noqa: E402
from jaxedit.models.flux import example_inputs  # noqa: E402
from references.models import flux_transformer as reference_model  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

B, LT = 3, 7


def grid_ids(h: int, w: int, first: float) -> np.ndarray:
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 0] = first
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(cfg: FluxConfig, seed=1):
    rng = np.random.default_rng(seed)
    img_ids = np.concatenate([grid_ids(3, 5, 0.0), grid_ids(4, 3, 1.0)])  # target | reference
    li = img_ids.shape[0]
    return dict(
        img=rng.standard_normal((B, li, cfg.in_channels)).astype(np.float32),
        img_ids=img_ids,
        txt=rng.standard_normal((B, LT, cfg.context_in_dim)).astype(np.float32),
        txt_ids=np.zeros((LT, 3), np.float32),
        timesteps=np.array([0.3, 0.75, 1.0], np.float32),
        y=rng.standard_normal((B, cfg.vec_in_dim)).astype(np.float32),
        guidance=np.array([3.5, 2.5, 4.0], np.float32),
    )


def run_reference(model, x, dtype=torch.float32):
    t = lambda a: torch.from_numpy(np.asarray(a)).to(dtype)  # noqa: E731
    with torch.no_grad():
        out = model.to(dtype)(
            hidden_states=t(x["img"]),
            encoder_hidden_states=t(x["txt"]),
            pooled_projections=t(x["y"]),
            timestep=t(x["timesteps"]),
            img_ids=torch.from_numpy(x["img_ids"]),
            txt_ids=torch.from_numpy(x["txt_ids"]),
            guidance=t(x["guidance"]),
            return_dict=False,
        )[0]
    return out.float().numpy()


def run_ours(params, cfg, x, *, dtype=jnp.float32, scan_layers=True):
    model = Flux(cfg, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    batch = lambda a: jnp.broadcast_to(a, (B, *a.shape))  # noqa: E731
    out = jax.jit(model.apply)(
        {"params": params},
        jnp.asarray(x["img"], dtype),
        batch(x["img_ids"]),
        jnp.asarray(x["txt"], dtype),
        batch(x["txt_ids"]),
        jnp.asarray(x["timesteps"]),
        jnp.asarray(x["y"], dtype),
        jnp.asarray(x["guidance"]),
    )
    return np.asarray(out.astype(jnp.float32))


TINY = FluxConfig(
    context_in_dim=40, vec_in_dim=24, hidden_size=48, num_heads=3, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6)
)
TINY_FULL_DEPTH = FluxConfig(**{**TINY.__dict__, "depth": 19, "depth_single_blocks": 38})


@pytest.fixture(scope="module", params=[TINY, TINY_FULL_DEPTH], ids=["depth2+2", "depth19+38"])
def converted(request, tmp_path_factory):
    cfg = request.param
    model = reference_model(cfg)
    path = tmp_path_factory.mktemp("flux_diffusers")
    model.save_pretrained(path, safe_serialization=True)
    params = load_transformer(path, cfg)
    return cfg, model, params


@pytest.mark.parametrize(
    "scan_layers",
    [True, pytest.param(False, marks=pytest.mark.full_depth_slow)],
    ids=["scan", "loop"],
)
def test_float32_parity(converted, scan_layers):
    """Both layer loops at 2+2 blocks; at the real depth 19+38 the scanned one (the unrolled one, 35 s of
    compile, is marked slow: the same stacked parameters run through the same blocks either way)."""
    cfg, model, params = converted
    x = make_inputs(cfg)
    ref = run_reference(model, x)
    ours = run_ours(params, cfg, x, scan_layers=scan_layers)
    err = rel_err(ours, ref)
    print(f"float32 rel err depth {cfg.depth}+{cfg.depth_single_blocks} scan={scan_layers}: {err:.2e}")
    assert err <= 1e-5


@pytest.mark.full_depth_slow
def test_bfloat16_within_twice_reference_error(converted):
    cfg, model, params = converted
    x = make_inputs(cfg)
    ref32 = run_reference(model, x)
    ref16 = run_reference(model, x, torch.bfloat16)
    model.to(torch.float32)
    ours16 = run_ours(params, cfg, x, dtype=jnp.bfloat16)
    err_ref, err_ours = rel_err(ref16, ref32), rel_err(ours16, ref32)
    print(f"bfloat16 rel err vs float32 reference: diffusers {err_ref:.3e}, ours {err_ours:.3e}")
    assert err_ref > 0
    assert err_ours <= 2 * err_ref


def test_converted_dtype_is_kept(tmp_path):
    """bfloat16 files stay bfloat16 unless a dtype is asked for."""
    model = reference_model(TINY).to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    params = load_transformer(tmp_path, TINY)
    assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
    params32 = load_transformer(tmp_path, TINY, dtype=np.float32)
    assert {p.dtype for p in jax.tree.leaves(params32)} == {np.dtype(np.float32)}


def test_bfl_layout_at_full_width(tmp_path):
    """BFL-layout file -> our converter, against diffusers' own BFL->diffusers conversion.

    diffusers' `convert_flux_transformer_checkpoint_to_diffusers` hard-codes hidden size 3072,
    so this runs at the real width (and real txt_in/vector_in sizes) with one block of
    each kind. The BFL key set and shapes come from the full-size manifest.
    """
    import dataclasses
    import re

    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file

    from checkpoints_convert.published import manifest_shapes

    cfg = dataclasses.replace(presets.get("flux-kontext-dev").transformer, depth=1, depth_single_blocks=1)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in manifest_shapes("bfl-flux1-kontext-dev").items():
        m = re.match(r"(double|single)_blocks\.(\d+)\.", k)
        if m and int(m.group(2)) > 0:
            continue
        if len(shape) == 2:
            state[k] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif k.endswith(".scale"):
            state[k] = 1 + torch.rand(shape, generator=g) - 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.1
    # the file as ComfyUI-style tools write it, with the wrapper prefix
    path = tmp_path / "flux1-kontext-dev.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(path))

    with torch.device("meta"):  # no random init of 0.5 G parameters that load_state_dict replaces (12 s)
        ref_model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    ref_model.load_state_dict(convert_flux_transformer_checkpoint_to_diffusers(dict(state)), strict=True, assign=True)
    del state
    x = make_inputs(cfg)
    ref = run_reference(ref_model.eval(), x)
    del ref_model
    params = load_transformer(path, cfg)
    assert params["double_blocks"]["img_attn"]["qkv"]["kernel"].shape == (1, 3072, 3, 3072)
    ours = run_ours(params, cfg, x)
    err = rel_err(ours, ref)
    print(f"BFL layout, width 3072, 1+1 blocks: float32 rel err {err:.2e}")
    assert err <= 1e-5


def test_mlp_token_chunks_are_the_same_computation():
    """`mlp_chunks` runs the MLPs on slices of the tokens (a smaller working set for the train step): the same
    parameter tree, the same output, the same gradients (up to float reassociation; 37 tokens in 3 slices)."""
    cfg = FluxConfig(**{**TINY.__dict__, "depth": 1, "depth_single_blocks": 1})
    rng = np.random.default_rng(4)
    args = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in example_inputs(cfg, 2, 37, 5)]
    plain, chunked = Flux(cfg), Flux(cfg, mlp_chunks=3)
    params = jax.jit(plain.init)(jax.random.key(0), *args)["params"]
    abstract = jax.eval_shape(chunked.init, jax.random.key(0), *args)["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, abstract)
    leaves, tree = jax.tree.flatten(params)
    params = tree.unflatten([x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), x.dtype) for x in leaves])

    def out_and_grad(m):  # one program: the output and the gradient of 0.5 * sum(output**2)
        def f(p):
            out, vjp = jax.vjp(lambda q: m.apply({"params": q}, *args), p)
            return out, vjp(out)[0]

        return jax.jit(f)(params)

    (out_c, grad_c), (out_p, grad_p) = out_and_grad(chunked), out_and_grad(plain)
    np.testing.assert_allclose(np.asarray(out_c), np.asarray(out_p), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_c), jax.tree.leaves(grad_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_closed_form_gradient_equals_autodiff(dtype):
    """`layer_norm`'s hand-written backward (the closed form, for XLA:CPU's fusion) against autodiff of the
    definition, statistics in float32 as in the forward (measured: float32 6.7e-8, bfloat16 equal)."""
    from jaxedit.models.layers import layer_norm

    def definition(x, eps=1e-6):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)).astype(x.dtype)

    rng = np.random.default_rng(7)
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((2, 9, 96)), dtype)
    w = jnp.asarray(rng.standard_normal((2, 9, 96)), dtype)
    grad = lambda f: jax.grad(lambda x: (f(x).astype(jnp.float32) * w).sum())(x)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(layer_norm(x), np.float32), np.asarray(definition(x), np.float32))
    ours, want = np.asarray(grad(layer_norm), np.float32), np.asarray(grad(definition), np.float32)
    assert rel_err(ours, want) <= (1e-6 if dtype == jnp.float32 else 1e-2)
