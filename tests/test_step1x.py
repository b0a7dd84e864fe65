"""Step1X-Edit: converter on the full-size manifest, connector parity, DiT wiring, CFG loop.

A tiny Step1X-Edit file is built the way the real one is laid out: the BFL DiT key set
of the full-size manifest (dimensions scaled down, random values) plus a connector
whose token refiner is diffusers' HunyuanVideoTokenRefiner (same math as S1X's
SingleTokenRefiner) with every parameter randomised, its keys renamed to the original
`connector.S.*` names. The file goes through our converter (and the CLI) once.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
diffusers_hv = pytest.importorskip("diffusers.models.transformers.transformer_hunyuan_video")

from checkpoints_convert import ConversionError, ShapeSource, load_transformer, part_config, plan_part  # noqa: E402
from checkpoints_convert.__main__ import main as convert_cli  # noqa: E402
from checkpoints_convert.mapping import flatten  # noqa: E402
from checkpoints_convert.published import manifest_shapes  # noqa: E402
from jaxedit import presets  # noqa: E402
from jaxedit.checkpoint import load_params  # noqa: E402
from jaxedit.models import Flux  # noqa: E402
from jaxedit.models.connector import Qwen2Connector  # noqa: E402
from jaxedit.models.step1x import Step1XEdit, abstract_params  # noqa: E402
from jaxedit.step1x.sampling import denoise_cfg, edit_ids, model_fn  # noqa: E402
from references.random import randomize_  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

PRESET = presets.get("step1x-edit-tiny")
DIT, CON = PRESET.transformer, PRESET.connector
B, L = 3, 7
VALID = (7, 4, 1)  # valid LLM tokens per batch row; the rest is padding


# ---------------------------------------------------------------------------------------
# Converter on abstract shapes


def test_full_size_manifest_maps_every_tensor():
    preset = presets.get("step1x-edit")
    shapes = manifest_shapes("step1x-edit")
    the_plan = plan_part("transformer", ShapeSource(shapes, "step1x-edit"), part_config(preset, "transformer"))
    assert the_plan.fmt == "step1x"
    targets = flatten(abstract_params(preset.transformer, preset.connector))
    assert set(the_plan.by_target) == set(targets)  # plan also checked every element written once, shapes exact
    assert "guidance_in" not in {k.split("/")[0] for k in targets}
    n_target = sum(int(np.prod(v.shape)) for v in targets.values())
    assert n_target == sum(int(np.prod(s)) for s in shapes.values()) == 12_427_800_385


def test_wrong_preset_or_missing_tensor_is_named():
    shapes = manifest_shapes("step1x-edit")
    with pytest.raises(ConversionError, match=r"connector\.S\."):  # a FLUX preset has no place for the connector
        plan_part("transformer", ShapeSource(shapes), presets.get("flux-kontext-dev").transformer)
    spec = part_config(presets.get("step1x-edit"), "transformer")
    with pytest.raises(ConversionError, match=r"guidance_in\.in_layer\.weight"):  # Kontext file, Step1X preset
        plan_part("transformer", ShapeSource(manifest_shapes("bfl-flux1-kontext-dev")), spec)
    key = "connector.S.individual_token_refiner.blocks.1.adaLN_modulation.1.bias"
    with pytest.raises(ConversionError, match=re.escape(key)):
        plan_part("transformer", ShapeSource({k: v for k, v in shapes.items() if k != key}), spec)


# ---------------------------------------------------------------------------------------
# A tiny Step1X-Edit file


def _reference_refiner():
    ref = diffusers_hv.HunyuanVideoTokenRefiner(
        in_channels=CON.in_channels,
        num_attention_heads=CON.num_heads,
        attention_head_dim=CON.head_dim,
        num_layers=CON.depth,
        mlp_ratio=CON.mlp_ratio,
    )
    randomize_(ref, seed=1)
    return ref.eval()


def _original_connector_names(sd: dict) -> dict[str, np.ndarray]:
    """diffusers HunyuanVideoTokenRefiner state dict -> S1X `connector.S.*` names (q/k/v fused)."""
    simple = [
        ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
        ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
        ("time_text_embed.text_embedder.linear_1", "c_embedder.linear_1"),
        ("time_text_embed.text_embedder.linear_2", "c_embedder.linear_2"),
        ("proj_in", "input_embedder"),
        ("attn.to_out.0", "self_attn_proj"),
        ("ff.net.0.proj", "mlp.fc1"),
        ("ff.net.2", "mlp.fc2"),
        ("norm_out.linear", "adaLN_modulation.1"),
        ("token_refiner.refiner_blocks", "individual_token_refiner.blocks"),
    ]
    out = {}
    for k, v in sd.items():
        if ".attn.to_q." in k or ".attn.to_k." in k or ".attn.to_v." in k:
            continue
        for theirs, ours in simple:
            k = k.replace(theirs, ours)
        out[f"connector.S.{k}"] = v.numpy()
    for i in range(CON.depth):
        for p in ("weight", "bias"):
            qkv = [sd[f"token_refiner.refiner_blocks.{i}.attn.to_{n}.{p}"].numpy() for n in "qkv"]
            out[f"connector.S.individual_token_refiner.blocks.{i}.self_attn_qkv.{p}"] = np.concatenate(qkv)
    return out


def _random_dit_tensors(rng) -> dict[str, np.ndarray]:
    """The DiT tensors of the real file (key set from the manifest), dimensions scaled to DIT."""
    h, m = DIT.hidden_size, DIT.mlp_hidden_dim
    dims = {3072: h, 12288: m, 9216: 3 * h, 18432: 6 * h, 21504: 3 * h + m, 15360: h + m, 6144: 2 * h}
    dims |= {128: DIT.head_dim, 4096: DIT.context_in_dim, 768: DIT.vec_in_dim, 64: DIT.in_channels, 256: 256}
    out = {}
    for k, shape in manifest_shapes("step1x-edit").items():
        blk = re.match(r"(double|single)_blocks\.(\d+)\.", k)
        if k.startswith("connector.") or (
            blk and int(blk.group(2)) >= (DIT.depth if blk.group(1) == "double" else DIT.depth_single_blocks)
        ):
            continue
        shape = [dims[d] for d in shape]
        if len(shape) == 2:
            out[k] = rng.standard_normal(shape) / np.sqrt(shape[1])
        elif k.endswith(".scale"):
            out[k] = 1 + rng.uniform(-0.5, 0.5, shape)
        else:
            out[k] = 0.1 * rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers refiner, {source name: tensor}, converted params)."""
    rng = np.random.default_rng(0)
    ref = _reference_refiner()
    tensors = _random_dit_tensors(rng) | _original_connector_names(ref.state_dict())
    tensors["connector.scale_factor"] = np.array([0.37], np.float32)
    tensors["connector.global_proj_out.weight"] = (
        rng.standard_normal((CON.pooled_dim, CON.in_channels)) / np.sqrt(CON.in_channels)
    ).astype(np.float32)
    tensors["connector.global_proj_out.bias"] = (0.1 * rng.standard_normal(CON.pooled_dim)).astype(np.float32)
    root = tmp_path_factory.mktemp("step1x")
    path = root / "step1x-edit-i1258.safetensors"
    save_file(tensors, str(path))
    # the CLI and the library give the same tree
    assert convert_cli(["transformer", str(path), str(root / "out"), "--preset", PRESET.name]) == 0
    params = load_transformer(path, part_config(PRESET, "transformer"))
    restored = flatten(load_params(root / "out"))
    assert set(restored) == set(flatten(params))
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v), err_msg=k)
    return ref, tensors, params


def llm_inputs(seed=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, L, CON.in_channels)).astype(np.float32)
    mask = (np.arange(L)[None, :] < np.array(VALID)[:, None]).astype(np.int64)
    t = np.array([0.9805, 0.5, 0.031], np.float32)
    return x, mask, t


# ---------------------------------------------------------------------------------------
# Connector


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_refiner_matches_diffusers(tiny, scan_layers):
    ref, _, params = tiny
    x, mask, t = llm_inputs()
    with torch.no_grad():  # the connector hands S the timestep already x1000
        want = ref(torch.from_numpy(x), torch.from_numpy(t * np.float32(1000)), torch.from_numpy(mask)).numpy()
    model = Qwen2Connector(CON, scan_layers=scan_layers)
    txt, _ = jax.jit(model.apply)({"params": params["connector"]}, x, t, mask)
    err = rel_err(txt, want)
    print(f"connector tokens vs diffusers HunyuanVideoTokenRefiner ({scan_layers=}): float32 rel err {err:.2e}")
    assert err <= 1e-5
    # padded tokens matter to the DiT (it attends to them unmasked): compare them separately too
    pad = mask == 0
    assert rel_err(np.asarray(txt)[pad], want[pad]) <= 1e-5


def test_step1x_only_parts_vs_numpy(tiny):
    """t x1000 into the sinusoid, the scaled masked mean and global_proj_out, in float64 numpy."""
    _, src, params = tiny
    x, mask, t = llm_inputs()
    (_, y), state = Qwen2Connector(CON).apply({"params": params["connector"]}, x, t, mask, capture_intermediates=True)
    lin = lambda a, name: a @ src[f"{name}.weight"].T.astype(np.float64) + src[f"{name}.bias"]  # noqa: E731
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    m = mask[..., None].astype(np.float64)
    mean = (x * m).sum(1) / m.sum(1)
    y_np = lin(mean * (1 + float(src["connector.scale_factor"][0])), "connector.global_proj_out")
    assert rel_err(y, y_np) <= 1e-6

    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    args = (1000.0 * t.astype(np.float64))[:, None] * freqs[None]
    s = "connector.S"
    t_emb_np = lin(
        silu(lin(np.concatenate([np.cos(args), np.sin(args)], -1), f"{s}.t_embedder.mlp.0")), f"{s}.t_embedder.mlp.2"
    )
    c_emb_np = lin(silu(lin(mean, f"{s}.c_embedder.linear_1")), f"{s}.c_embedder.linear_2")
    inter = state["intermediates"]["S"]
    assert rel_err(inter["t_embedder"]["__call__"][0], t_emb_np) <= 1e-5
    assert rel_err(inter["c_embedder"]["__call__"][0], c_emb_np) <= 1e-6


# ---------------------------------------------------------------------------------------
# The whole model


def dit_inputs(seed=3):
    rng = np.random.default_rng(seed)
    h2, w2 = 3, 5  # non-square; the reference has the target's size and ids
    ids = np.broadcast_to(edit_ids(h2, w2), (B, 2 * h2 * w2, 3))
    img = rng.standard_normal((B, 2 * h2 * w2, DIT.in_channels)).astype(np.float32)
    return img, ids


def test_dit_equals_flux_path_fed_by_connector(tiny):
    _, _, params = tiny
    x, mask, t = llm_inputs()
    img, ids = dit_inputs()
    apply = jax.jit(Step1XEdit(DIT, connector_cfg=CON).apply)
    out = apply({"params": params}, img, ids, x, mask, t)
    txt, y = Qwen2Connector(CON).apply({"params": params["connector"]}, x, t, mask)
    dit_params = {k: v for k, v in params.items() if k != "connector"}
    want = jax.jit(Flux(DIT).apply)({"params": dit_params}, img, ids, txt, np.zeros((B, L, 3), np.float32), t, y)
    assert out.shape == (B, ids.shape[1], DIT.out_channels)
    assert float(jnp.abs(out).mean()) > 1e-2  # every zero-initialised output layer was overwritten
    err = rel_err(out, want)
    print(f"Step1XEdit vs Flux fed the connector outputs: rel err {err:.2e}")
    assert err <= 1e-6
    # the DiT does not mask the text: changing a padded LLM token changes the output
    x2 = x.copy()
    x2[2, -1] += 1.0
    out2 = apply({"params": params}, img, ids, x2, mask, t)
    assert float(jnp.abs(out2 - out)[2].max()) > 1e-6 and float(jnp.abs(out2 - out)[:2].max()) == 0.0


def test_cfg_loop_vs_numpy_reference_loop(tiny):
    """denoise_cfg against S1X's loop written out in numpy: batch [cond, uncond] of the full
    [target | reference] sequence, the whole sequence stepped, then the reference restored."""
    _, _, params = tiny
    model = Step1XEdit(DIT, connector_cfg=CON)
    apply = jax.jit(model.apply)
    rng = np.random.default_rng(4)
    x, mask, _ = llm_inputs()
    n, lt, w = 2, 15, 4.5
    cond, uncond = x[:n], x[1 : n + 1]
    mcond, muncond = mask[:n], mask[1 : n + 1]
    noise = rng.standard_normal((n, lt, DIT.in_channels)).astype(np.float32)
    ref = rng.standard_normal((n, lt, DIT.in_channels)).astype(np.float32)
    ids = edit_ids(3, 5)
    timesteps = np.array([1.0, 0.8, 0.45, 0.0], np.float32)

    ours = denoise_cfg(
        model_fn(model, params), noise, ref, np.broadcast_to(ids, (n, 2 * lt, 3)), cond, mcond, uncond, muncond,
        timesteps, w,
    )  # fmt: skip

    want = []
    for i in range(n):  # one sample at a time, as the reference runs it
        img = np.concatenate([noise[i : i + 1], ref[i : i + 1]], axis=1).astype(np.float64)
        llm = np.stack([cond[i], uncond[i]])
        msk = np.stack([mcond[i], muncond[i]])
        for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
            img2 = np.concatenate([img, img]).astype(np.float32)
            pred = np.asarray(apply({"params": params}, img2, np.stack([ids, ids]), llm, msk, np.full(2, t_curr)))
            pred = pred[1] + w * (pred[0] - pred[1])
            stepped = img[0] + (float(t_prev) - float(t_curr)) * pred
            img = np.concatenate([stepped[:lt], img[0, lt:]])[None]
        want.append(img[0, :lt])
    err = rel_err(ours, np.stack(want))
    print(f"CFG loop vs numpy reference loop: rel err {err:.2e}")
    assert err <= 1e-5
    assert rel_err(ours, noise) > 0.1  # the loop moved the latent


def test_connector_bfloat16_within_twice_reference_error(tiny):
    ref, _, params = tiny
    x, mask, t = llm_inputs()
    args = lambda dt: (torch.from_numpy(x).to(dt), torch.from_numpy(t).to(dt) * 1000, torch.from_numpy(mask))  # noqa: E731
    with torch.no_grad():
        want = ref(*args(torch.float32)).numpy()
        ref16 = ref.to(torch.bfloat16)(*args(torch.bfloat16)).float().numpy()
    ref.to(torch.float32)
    p16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params["connector"])
    ours16, _ = Qwen2Connector(CON, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply({"params": p16}, x, t, mask)
    err_ref, err_ours = rel_err(ref16, want), rel_err(ours16, want)
    print(f"connector bfloat16 rel err vs float32 reference: diffusers {err_ref:.3e}, ours {err_ours:.3e}")
    assert 0 < err_ours <= 2 * err_ref
