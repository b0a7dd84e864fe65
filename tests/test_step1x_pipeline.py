"""Step1X-Edit pipeline end to end: a tiny random model folder (`step1x-edit-tiny`) with the
tiny random Qwen2.5-VL, against the reference's `generate_image` written out in numpy
(size, resize, [0,1] -> [-1,1], VAE, ids, Qwen on [prompt, ""], schedule, CFG Euler steps on
the whole sequence with the reference restored, decode, truncation, resize back); the
model and VAE calls themselves are jaxedit's (tested elsewhere). Also the CLI and the
release converter.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")

from jaxedit import quant  # noqa: E402
from jaxedit.cli import main as cli  # noqa: E402
from jaxedit.models.step1x import Step1XEdit  # noqa: E402
from jaxedit.step1x.pipeline import Step1XEditPipeline  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.tiny_step1x import PRESET, make_tiny_step1x  # noqa: E402

W, H, SIZE_LEVEL, STEPS = 64, 48, 48, 2  # -> working size 48x32: 3x2 target tokens
PROMPTS, SEEDS, GUIDANCE = ['write "Hi" on it', "make it red"], [3, 4], [6.0, 3.5]


def images():
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in PROMPTS]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_qwen):
    qwen, qcfg = tiny_qwen
    folder = make_tiny_step1x(tmp_path_factory.mktemp("step1x") / "model", qwen, qcfg, options={"steps": 8})
    pipe = Step1XEditPipeline.load(
        folder, dtype=jnp.float32, compile_cache=False, qwen_dtype="float32", size_level=SIZE_LEVEL
    )
    return folder, pipe


def reference_generate(pipe, images, prompts, guidance, latents):
    """S1X inference.py generate_image per item (batched over items here), in numpy around
    jaxedit's model and VAE calls. Returns (final target tokens, working size, PIL outputs)."""
    w0, h0 = images[0].size
    r = w0 / h0  # input_process_image
    if w0 > h0:
        w = math.ceil(math.sqrt(SIZE_LEVEL * SIZE_LEVEL * r))
        h = math.ceil(w / r)
    else:
        h = math.ceil(math.sqrt(SIZE_LEVEL * SIZE_LEVEL / r))
        w = math.ceil(h * r)
    w, h = w // 16 * 16, h // 16 * 16
    resized = [im.resize((w, h)) for im in images]
    raw = np.stack([np.asarray(im, np.float32) for im in resized]) / 255.0
    z = np.asarray(vae_call(pipe, "encode", raw * 2 - 1))  # [n, h/8, w/8, 16]
    n, lt = len(images), (h // 16) * (w // 16)
    ref = z.reshape(n, h // 16, 2, w // 16, 2, 16).transpose(0, 1, 3, 5, 2, 4).reshape(n, lt, 64)
    ids = np.zeros((h // 16, w // 16, 3), np.float32)
    ids[..., 1] = np.arange(h // 16)[:, None]
    ids[..., 2] = np.arange(w // 16)[None, :]
    ids = np.concatenate([ids.reshape(-1, 3)] * 2)  # reference ids = target ids
    m = (1.15 - 0.5) / (4096 - 256)
    mu = lt * m + 0.5 - m * 256
    t = np.linspace(1, 0, STEPS + 1)
    with np.errstate(divide="ignore"):
        timesteps = np.exp(mu) / (np.exp(mu) + (1 / t - 1))
    # per item the CFG batch [prompt, ""], both with the item's image; items side by side
    llm, mask = zip(*(pipe.text_encoder.encode([p, ""], [im, im]) for p, im in zip(prompts, resized)))
    llm, mask = np.concatenate(llm), np.concatenate(mask)  # [c0, u0, c1, u1]
    img = np.concatenate([latents, ref], axis=1).astype(np.float64)
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        both = np.repeat(img, 2, axis=0).astype(np.float32)
        pred = np.asarray(DIT({"params": pipe.params["transformer"]}, both, ids[None].repeat(2 * n, 0), llm, mask,
                              np.full(2 * n, t_curr)))  # fmt: skip
        cond, uncond = pred[0::2], pred[1::2]
        pred = uncond + np.asarray(guidance)[:, None, None] * (cond - uncond)
        stepped = img + (t_prev - t_curr) * pred
        img = np.concatenate([stepped[:, :lt], img[:, lt:]], axis=1)  # reference tokens restored
    x = img[:, :lt]
    zz = x.reshape(n, h // 16, w // 16, 16, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(n, h // 8, w // 8, 16)
    dec = np.asarray(vae_call(pipe, "decode", zz.astype(np.float32)))
    u8 = ((np.clip(dec, -1, 1) * 0.5 + 0.5) * 255).astype(np.uint8)  # to_pil_image truncates
    return x, (w, h), [Image.fromarray(a).resize(im.size) for a, im in zip(u8, images)]


DIT = jax.jit(Step1XEdit(PRESET.transformer, connector_cfg=PRESET.connector).apply)


def vae_call(pipe, method, x):
    """jaxedit's VAE, through the pipeline's compiled programs (same placement, so no recompile)."""
    from jaxedit.parallel import placement
    from jaxedit.parallel import sharding as sh

    mesh, n = pipe.mesh, placement.padded(len(x), pipe.mesh)
    fn = pipe.encode_images if method == "encode" else pipe.decode_latents
    with sh.activate(mesh):
        return fn(pipe.params["vae"], pipe.put_batch(mesh, placement.pad(x, n)))[: len(x)]


def test_edit_matches_reference_loop(model):
    _, pipe = model
    imgs = images()
    prepared = [pipe.prepare(im) for im in imgs]
    assert {(p.width, p.height, p.out_size) for p in prepared} == {(48, 32, (W, H))}
    latents = np.random.default_rng(1).standard_normal((2, 6, 64)).astype(np.float32)
    kw = dict(steps=STEPS, guidance=GUIDANCE, latents=latents)
    ours_lat = pipe(imgs, PROMPTS, SEEDS, output="latents", **kw)
    ours_img = pipe(imgs, PROMPTS, SEEDS, **kw)
    want_lat, size, want_img = reference_generate(pipe, imgs, PROMPTS, GUIDANCE, latents)
    assert size == (48, 32)
    for i in range(2):
        assert ours_img[i].size == want_img[i].size == (W, H)
        err = rel_err(ours_lat[i], want_lat[i])
        diff = np.abs(np.asarray(ours_img[i], int) - np.asarray(want_img[i], int))
        print(f"item {i}: final latents rel err {err:.1e}; output pixels max diff {diff.max()}")
        assert err <= 1e-5 and rel_err(ours_lat[i], latents[i]) > 0.1
        assert (diff <= 1).mean() >= 0.999

    # precomputed Qwen embeddings give the same result; without them and without Qwen: a clear error
    llm = pipe.encode_prompts(prepared, PROMPTS)
    assert llm[0].shape == (4, pipe.text_encoder.config.max_length, PRESET.connector.in_channels)
    again = pipe(imgs, PROMPTS, SEEDS, output="latents", llm=llm, **kw)
    np.testing.assert_array_equal(again, ours_lat)
    # int8 DiT weights (jaxedit.quant; the connector stays float): the same edit, close to the float one
    params = pipe.params | {"transformer": quant.quantize_params("transformer", pipe.params["transformer"], "int8")}
    int8 = Step1XEditPipeline(PRESET, params, None, dtype=jnp.float32, size_level=SIZE_LEVEL)
    err = rel_err(int8(imgs, PROMPTS, SEEDS, output="latents", llm=llm, **kw), ours_lat)
    print(f"int8 weights: final latents rel err {err:.1e} against float32 weights")
    assert 0 < err < 0.02
    no_qwen = Step1XEditPipeline(PRESET, pipe.params, None, dtype=jnp.float32)
    with pytest.raises(ValueError, match="llm="):
        no_qwen(imgs, PROMPTS, SEEDS, **kw)


def test_cli_detects_step1x_folder(model, tmp_path, monkeypatch, capsys):
    folder, pipe = model
    for i, im in enumerate(images()):
        im.save(tmp_path / f"{i}.png")
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"e{i}", "image": f"{i}.png", "prompt": p}) + "\n"
                                for i, p in enumerate(PROMPTS)))  # fmt: skip
    calls = []

    def load(path, **kw):  # the loaded pipeline (already compiled for this batch), as the CLI asks for it
        calls.append((path, kw))
        return pipe

    monkeypatch.setattr(Step1XEditPipeline, "load", load)
    argv = ["--model", str(folder), "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--batch-size", "2",
            "--steps", str(STEPS), "--size-level", str(SIZE_LEVEL), "--qwen", "/elsewhere/qwen"]  # fmt: skip
    assert cli(["batch", *argv]) == 0
    # (the folder as the CLI opened it: `ModelFolder`, its jaxedit.json read once)
    assert [(opened.path, kw) for opened, kw in calls] == [
        (folder, {"dtype": None, "qwen": "/elsewhere/qwen", "size_level": SIZE_LEVEL})
    ]
    results = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["status"], r["width"], r["height"], r["guidance"]) for r in results] == [("ok", W, H, 6.0)] * 2
    assert Image.open(tmp_path / "out" / "e0.png").size == (W, H)
    monkeypatch.undo()

    # a folder without a converted Qwen2.5-VL names the way to add one; so does a transformers folder
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "qwen")
    edit = ["edit", "--model", str(broken), "--image", str(tmp_path / "0.png"), "--prompt", "x", "--out",
            str(tmp_path / "x.png")]  # fmt: skip
    capsys.readouterr()
    for argv, message in (
        (edit, "no converted Qwen2.5-VL.*add-qwen"),
        ([*edit, "--qwen", str(tmp_path / "other-qwen")], "other-qwen"),
    ):
        with pytest.raises(SystemExit) as e:
            cli(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err


def _release_tensors(rng) -> dict[str, np.ndarray]:
    """A tiny `step1x-edit-i1258.safetensors`: the real key set (manifest), dims scaled to the preset."""
    from checkpoints_convert.published import manifest_shapes

    dit, con = PRESET.transformer, PRESET.connector
    h, m = dit.hidden_size, dit.mlp_hidden_dim
    dit_dims = {3072: h, 12288: m, 9216: 3 * h, 18432: 6 * h, 21504: 3 * h + m, 15360: h + m, 6144: 2 * h,
                128: dit.head_dim, 4096: dit.context_in_dim, 768: dit.vec_in_dim, 64: dit.in_channels,
                256: 256}  # fmt: skip
    hc = con.hidden_size
    con_dims = {4096: hc, 3584: con.in_channels, 16384: con.mlp_hidden_dim, 12288: 3 * hc, 8192: 2 * hc,
                768: con.pooled_dim, 256: 256, 1: 1}  # fmt: skip
    out = {}
    for k, shape in manifest_shapes("step1x-edit").items():
        block = k.split(".")[:2]
        if block[0] in ("double_blocks", "single_blocks"):
            depth = dit.depth if block[0] == "double_blocks" else dit.depth_single_blocks
            if int(block[1]) >= depth:
                continue
        dims = con_dims if k.startswith("connector.") else dit_dims
        out[k] = rng.standard_normal([dims[d] for d in shape]).astype(np.float32)
    return out


def _vae_tensors(cfg, rng) -> dict[str, np.ndarray]:
    from checkpoints_convert.published import manifest_shapes

    full = 128
    dims = {full * mult: cfg.ch * mult for mult in (1, 2, 4)} | {32: 2 * cfg.z_channels, 16: cfg.z_channels, 3: 3, 1: 1}
    return {
        k: rng.standard_normal([dims[d] for d in s]).astype(np.float32) for k, s in manifest_shapes("bfl-ae").items()
    }


def test_release_converts_to_a_model_folder(tmp_path, tiny_qwen, capsys):
    import dataclasses

    from checkpoints_convert.__main__ import main as convert_cli
    from checkpoints_convert.mapping import flatten
    from checkpoints_convert.pipeline import convert_pipeline
    from jaxedit import configs
    from jaxedit.checkpoint import load_params
    from jaxedit.model_folder import read_description
    from jaxedit.step1x.text import read_qwen

    vae_cfg = configs.AutoEncoderConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=8)  # BFL structure
    preset = dataclasses.replace(PRESET, vae=vae_cfg)
    src = tmp_path / "release"
    src.mkdir()
    rng_vae = np.random.default_rng(1)
    save_file(_release_tensors(np.random.default_rng(0)), str(src / "step1x-edit-i1258.safetensors"))
    save_file(_vae_tensors(vae_cfg, np.random.default_rng(1)), str(src / "vae.safetensors"))
    qwen, _ = tiny_qwen
    args = ["pipeline", str(src), str(tmp_path / "out"), "--preset", PRESET.name, "--qwen", str(tmp_path / "missing")]
    assert convert_cli(args) == 2  # a missing Qwen folder fails before anything is written
    assert not (tmp_path / "out").exists() and "missing" in capsys.readouterr().err
    convert_pipeline(src, tmp_path / "out", preset, qwen=qwen)
    dst = tmp_path / "out"
    from jaxedit.models.step1x import abstract_params

    tensors = {**_release_tensors(np.random.default_rng(0)), **_vae_tensors(vae_cfg, rng_vae)}
    dit = flatten(load_params(dst / "transformer"))
    want = flatten(abstract_params(PRESET.transformer, PRESET.connector))
    assert {k: v.shape for k, v in dit.items()} == {k: v.shape for k, v in want.items()}
    np.testing.assert_array_equal(dit["img_in/kernel"], tensors["img_in.weight"].T)
    np.testing.assert_array_equal(dit["connector/scale_factor"], tensors["connector.scale_factor"])
    np.testing.assert_array_equal(
        dit["connector/global_proj_out/kernel"], tensors["connector.global_proj_out.weight"].T
    )
    vae = flatten(load_params(dst / "vae"))
    np.testing.assert_array_equal(
        vae["encoder/conv_in/kernel"], tensors["encoder.conv_in.weight"].transpose(2, 3, 1, 0)
    )
    desc = read_description(dst)
    assert desc.family == "step1x-edit" and desc.connector == PRESET.connector and desc.vae == vae_cfg
    path, qcfg = read_qwen(dst)
    assert path is None and qcfg.hidden_size == PRESET.connector.in_channels
    # the Qwen2.5-VL converted into qwen/ (every tensor, exact; transformers saves the published `visual.` /
    # `model.` names), its processor files beside
    from safetensors.numpy import load_file

    from checkpoints_convert.qwen import QWEN_PROCESSOR_NEEDED
    from jaxedit.configs import QwenVLConfig
    from jaxedit.models.qwen2_5_vl import abstract_params as qwen_abstract

    hf = load_file(str(qwen / "model.safetensors"))
    got = flatten(load_params(dst / "qwen"))
    qwen_cfg = QwenVLConfig.from_dict(json.loads((dst / "jaxedit.json").read_text())["qwen"]["model"])
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in flatten(qwen_abstract(qwen_cfg)).items()}
    np.testing.assert_array_equal(got["language_model/embed_tokens/embedding"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["visual/blocks/qkv/kernel"][1], hf["visual.blocks.1.attn.qkv.weight"].T)
    assert all((dst / "qwen_processor" / f).is_file() for f in QWEN_PROCESSOR_NEEDED)


def test_load_honours_the_folders_dtype_option(tmp_path):
    """The folder's pipeline option "dtype" sets the DiT's dtype unless the caller names one (as for Kontext)."""
    plain = make_tiny_step1x(tmp_path / "plain")
    f32 = make_tiny_step1x(tmp_path / "f32", options={"dtype": "float32"})
    load = lambda f, **kw: Step1XEditPipeline.load(f, text_encoder=False, compile_cache=False, **kw)  # noqa: E731
    assert load(plain).model.dtype == jnp.bfloat16
    assert load(f32).model.dtype == jnp.float32
    assert load(f32, dtype=jnp.bfloat16).model.dtype == jnp.bfloat16
    leaves = jax.tree.leaves(load(f32).params["transformer"])
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    int8 = load(plain, quantize="int8")  # quantised as it loads: the DiT's block kernels, not the connector's
    assert int8.quantized == {"transformer": "int8"}
    t = int8.params["transformer"]
    assert t["double_blocks"]["img_mlp"]["0"]["kernel"].dtype == jnp.int8
    assert t["double_blocks"]["img_mlp"]["0"]["kernel_scale"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(t["connector"])} == {jnp.dtype(jnp.bfloat16)}


def test_sample_edits_of_a_step1x_run(model, tmp_path):
    """Training's sample edits (`sample_every`) work for Step1X-Edit too: the grid follows the weights."""
    import types

    from jaxedit.train.monitor import SampleEdits

    folder, pipe = model
    items = []
    for i, im in enumerate(images()):
        im.save(tmp_path / f"{i}.png")
        items.append(types.SimpleNamespace(source=tmp_path / f"{i}.png", target=tmp_path / f"{i}.png",
                                           instruction=PROMPTS[i]))  # fmt: skip
    sampler = SampleEdits(pipe, items, tmp_path / "run", steps=STEPS)
    base = jax.tree.map(np.asarray, pipe.params["transformer"])
    first = np.asarray(Image.open(sampler(1, base)))
    assert first.shape == (2 * H, 3 * W, 3)
    second = np.asarray(Image.open(sampler(2, jax.tree.map(lambda p: p * 1.5, base))))
    assert np.abs(second[:, W : 2 * W].astype(int) - first[:, W : 2 * W]).max() > 10
    pipe.set_transformer(base)


def test_edit_runs_with_no_torch_installed(model, tmp_path):
    """A fresh process where `import torch` fails loads the model folder (its converted Qwen2.5-VL included)
    and edits: the same latents as this process' pipeline, and torch never imported."""
    folder, pipe = model
    imgs = images()[:1]
    imgs[0].save(tmp_path / "in.png")
    latents = np.random.default_rng(1).standard_normal((1, 6, 64)).astype(np.float32)
    np.save(tmp_path / "noise.npy", latents)
    kw = dict(steps=STEPS, guidance=GUIDANCE[:1])
    want = pipe(imgs, PROMPTS[:1], SEEDS[:1], output="latents", latents=latents, **kw)
    code = f"""
import sys
sys.modules["torch"] = None  # as if torch were not installed: `import torch` raises ImportError
import jax.numpy as jnp, numpy as np
from PIL import Image
from jaxedit.step1x.pipeline import Step1XEditPipeline
pipe = Step1XEditPipeline.load({str(folder)!r}, dtype=jnp.float32, compile_cache=False, qwen_dtype="float32",
                               size_level={SIZE_LEVEL})
out = pipe([Image.open({str(tmp_path / "in.png")!r})], {PROMPTS[:1]!r}, {SEEDS[:1]!r}, output="latents",
           latents=np.load({str(tmp_path / "noise.npy")!r}), steps={STEPS}, guidance={GUIDANCE[:1]!r})
assert sys.modules.get("torch") is None, "torch was imported"
np.save({str(tmp_path / "out.npy")!r}, np.asarray(out))
"""
    root = Path(__file__).resolve().parent.parent  # this process' XLA flags and devices; the checkout's jaxedit
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_add_qwen_refuses_a_mismatched_or_incomplete_folder(tmp_path, tiny_qwen, capsys):
    """`add-qwen` checks before writing: a Qwen2.5-VL whose width is not the connector's in_channels, or one
    without its image processor, is named in one line and the model folder is left as it was."""
    from checkpoints_convert.__main__ import main as convert_cli

    qwen, qcfg = tiny_qwen
    folder = make_tiny_step1x(tmp_path / "model", None, qcfg)
    before = sorted(p.name for p in folder.iterdir())
    wide = tmp_path / "wide"
    shutil.copytree(qwen, wide)
    cfg = json.loads((wide / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 32  # head_dim 16: rotary sections of 8 pairs
    for d in (cfg, cfg["text_config"]):
        for key in ("rope_parameters", "rope_scaling"):
            if isinstance(d.get(key), dict) and "mrope_section" in d[key]:
                d[key]["mrope_section"] = [2, 3, 3]
    (wide / "config.json").write_text(json.dumps(cfg))
    no_processor = tmp_path / "no_processor"
    shutil.copytree(qwen, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    for src, message in ((wide, "hidden size 32 != the connector's in_channels 28"),
                         (no_processor, "missing preprocessor_config.json")):  # fmt: skip
        assert convert_cli(["add-qwen", str(folder), str(src)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in folder.iterdir()) == before
    assert convert_cli(["add-qwen", str(folder), str(qwen)]) == 0
    assert {"qwen", "qwen_processor"} <= {p.name for p in folder.iterdir()}
