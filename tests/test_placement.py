"""The pipelines run the placement they are given, and the planner compiles what they run.

On the 8 fake CPU devices (tests/conftest.py): a tiny FLUX.1 Kontext and Step1X-Edit folder loaded
replicated (data parallel) and sharded (FSDP, FSDP x data, tensor) give the same edits to float32
precision; the sampling loop `jaxedit plan` lowers is the one `generate` runs (same HLO); `auto` follows
its rule and a recorded choice; a batch runs on the fewest data rows that keep every device busy, padded
where it must be.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxedit import plan, presets
from jaxedit.configs import MeshConfig
from jaxedit.kontext.pipeline import KontextPipeline
from jaxedit.parallel import placement
from jaxedit.pipelines.base import choose_mesh
from tests.helpers import rel_err

W, H = 64, 48
PROMPTS = ["make the cat wear a blue hat", "add snow to the mountains", "turn it into a watercolour"]


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tiny_kontext):
    return tiny_kontext[1]


def load(folder, mesh, devices=4, **kw):
    return KontextPipeline.load(folder, dtype=kw.pop("dtype", jnp.float32), auto_resize=False, compile_cache=False,
                                mesh=mesh, devices=jax.devices()[:devices], **kw)  # fmt: skip


def test_rows_and_padding():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
    assert [placement.rows_for(b, mesh) for b in (1, 2, 3, 8, 9, 16)] == [1, 2, 3, 8, 5, 8]
    fsdp = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    assert [placement.rows_for(b, fsdp) for b in (1, 4, 5, 8)] == [1, 1, 2, 2]
    assert placement.padded(5, fsdp) == 8 and placement.padded(3, mesh) == 8
    np.testing.assert_array_equal(placement.pad(np.arange(3), 5), [0, 1, 2, 2, 2])


@pytest.mark.parametrize("mesh", ["fsdp=4", "data=2,fsdp=2", "fsdp=2,tensor=2"])
def test_sharded_kontext_equals_replicated(folder, mesh):
    """Every part (DiT, T5, CLIP, VAE) sharded by the rule table: the same edits as the replicated pipeline, for
    a batch the mesh's batch axes divide and one they do not (3 items: padded)."""
    base = load(folder, None)
    ours = load(folder, mesh)
    assert base.mesh_text == "data=4" and ours.mesh_text == mesh
    kernel = ours.params["transformer"]["double_blocks"]["img_attn"]["qkv"]["kernel"]
    assert kernel.sharding.spec != jax.sharding.PartitionSpec()  # really sharded
    t5 = jax.tree.leaves(ours.text_encoder.t5_params)
    assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in t5) or "tensor" in mesh
    imgs = images()
    for n in (3, 2):
        a = base(imgs[:n], PROMPTS[:n], list(range(n)), steps=2, output="latents")
        b = ours(imgs[:n], PROMPTS[:n], list(range(n)), steps=2, output="latents")
        assert a.shape == b.shape == (n, (H // 16) * (W // 16), 64)
        print(f"Kontext {mesh}, {n} items: final latents rel err {rel_err(b, a):.2e} against replicated")
        assert rel_err(b, a) < 1e-5, (mesh, n, rel_err(b, a))


def test_sharded_step1x_equals_replicated(tmp_path_factory, tiny_qwen):
    from jaxedit.step1x.pipeline import Step1XEditPipeline
    from tests.tiny_step1x import make_tiny_step1x

    qwen, qcfg = tiny_qwen
    folder = make_tiny_step1x(tmp_path_factory.mktemp("step1x") / "model", qwen, qcfg)
    kw = dict(dtype=jnp.float32, compile_cache=False, qwen_dtype="float32", size_level=64)
    base = Step1XEditPipeline.load(folder, devices=jax.devices()[:4], **kw)
    ours = Step1XEditPipeline.load(folder, devices=jax.devices()[:4], mesh="data=2,fsdp=2", **kw)
    assert ours.text_encoder.mesh is not None and ours.text_encoder.mesh.shape["fsdp"] == 2
    imgs = images(3, seed=5)
    a = base(imgs, PROMPTS, [0, 1, 2], steps=2, output="latents")
    b = ours(imgs, PROMPTS, [0, 1, 2], steps=2, output="latents")
    print(f"Step1X data=2,fsdp=2, 3 items: final latents rel err {rel_err(b, a):.2e} against replicated")
    assert rel_err(b, a) < 1e-5, rel_err(b, a)


def test_the_planner_compiles_the_program_generate_runs(folder):
    """`jaxedit plan --task sample` lowers the pipeline's own loop with the pipeline's own placement: the same
    HLO as the call `generate` makes (bfloat16, FSDP x data on 4 devices, 3 items padded to 4)."""
    pipe = load(folder, "data=2,fsdp=2", dtype=jnp.bfloat16)
    seen = []
    run = pipe.denoise

    def spy(*a):
        seen.append(run.lower(*a).as_text())
        return run(*a)

    pipe.denoise = spy
    steps, n = 3, 3
    pipe(images(n), PROMPTS[:n], list(range(n)), steps=steps, width=W, height=H)
    preset = presets.get("flux-kontext-tiny")
    args = argparse.Namespace(steps=steps, attention="auto", text_tokens=preset.t5.max_length)
    f = preset.vae.downsample
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2, 1), ("data", "fsdp", "tensor"))
    planned = planned_sample(preset, args, mesh, n, H // f, W // f)
    assert len(seen) == 1 and seen[0] == planned


def planned_sample(preset, args, mesh, batch, h, w) -> str:
    """The planner's sampling program for a (h, w)-cell target and one reference of that size."""
    from jaxedit.parallel import sharding as sh

    pipe = plan.sample_pipeline(preset, mesh, args.attention)
    on, a = pipe.sample_inputs(batch, h, w, args.steps, references=1, text_tokens=args.text_tokens)
    with sh.activate(on):
        return pipe.denoise.lower(*a).as_text()


def test_auto_rule_and_recorded_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXEDIT_PLACEMENTS", str(tmp_path / "placements.json"))
    preset = presets.get("flux-kontext-dev")
    devices = jax.devices()
    full = KontextPipeline.footprint(preset, jnp.bfloat16, {})
    assert 33e9 < full.weights < 35e9  # DiT 23.8 GB + T5-XXL 9.5 GB + CLIP + VAE, bfloat16 (the VAE float32)
    assert 0.6e9 < full.block_bytes < 0.7e9  # a double block in bfloat16
    int8 = KontextPipeline.footprint(preset, jnp.bfloat16, {"transformer": "int8", "t5": "int8"}, text_on_cpu=True)
    assert 11e9 < int8.weights < 13e9 and int8.block_bytes < 0.36e9

    def pick(memory, footprint=full, devices=devices):
        return choose_mesh(preset, "auto", devices, footprint, quantize=None, memory=memory)

    assert pick(None) == MeshConfig(data=8, fsdp=1)  # memory unknown (CPU): replicated
    assert pick(95e9) == MeshConfig(data=8, fsdp=1)  # v5p: the weights fit a chip
    assert pick(32e9) == MeshConfig(data=4, fsdp=2)  # v6e: pairs of chips
    assert pick(16e9) == MeshConfig(data=2, fsdp=4)  # v5e: groups of 4
    # int8 DiT, T5 in host memory, one v5e: the rule's 15.4 GB is over 90% of 16 GB, so it warns and tries the one
    # placement a chip has (the TPU compiler's figure for that program: 14.5 GB, it fits); on two chips, replicated
    with pytest.warns(UserWarning, match="do not fit 1 chip"):
        assert pick(16e9, int8, devices[:1]) == MeshConfig(data=1, fsdp=1)
    assert pick(17.5e9, int8, devices[:2]) == MeshConfig(data=2, fsdp=1)
    with pytest.warns(UserWarning, match="do not fit 8 chip"):
        assert pick(4e9) == MeshConfig(data=1, fsdp=8)  # the compiler's memory check has the last word
    key = placement.key_for(preset, None, devices)
    placement.record(key, MeshConfig(data=2, fsdp=1, tensor=4), {"task": "sample"})
    assert pick(32e9) == MeshConfig(data=2, fsdp=1, tensor=4)  # the planner's choice wins
    assert placement.recorded(placement.key_for(preset, "int8", devices)) is None  # other weights: not recorded
    assert choose_mesh(preset, "fsdp=-1", devices, full, quantize=None) == MeshConfig(fsdp=8)
    with pytest.raises(ValueError, match="does not use exactly the 8 devices"):
        choose_mesh(preset, "fsdp=3", devices, full, quantize=None)


def test_plan_mesh_auto_ranks_and_records(tmp_path, monkeypatch, capsys):
    """`jaxedit plan --mesh auto` compiles every candidate (here on 4 simulated CPU devices) and records the best
    for the pipelines' mesh 'auto'."""
    monkeypatch.setenv("JAXEDIT_PLACEMENTS", str(tmp_path / "placements.json"))
    args = ["--task", "sample", "--preset", "flux-kontext-tiny", "--mesh", "auto", "--resolution", "64",
            "--text-tokens", "8", "--steps", "2"]  # fmt: skip
    assert plan.plan_auto(plan.parser().parse_args(args)) == 0
    out = capsys.readouterr().out
    for cand in ("data=8", "data=4,fsdp=2", "data=2,fsdp=4", "fsdp=8", "data=4,tensor=2"):
        assert f"  {cand}: " in out
    assert "ranked (fits, fastest first):" in out and "recorded" in out
    preset = presets.get("flux-kontext-tiny")
    assert placement.recorded(placement.key_for(preset, None, jax.devices())) is not None


def test_cli_mesh_option_and_folder_option(folder, tmp_path, capsys):
    """`jaxedit edit --mesh` runs the edit on that mesh; a mesh that does not fit the devices, from the flag or
    the model folder's pipeline option, is one line naming where it came from."""
    import json
    import shutil

    from jaxedit.cli import main as cli

    images(1)[0].save(tmp_path / "in.png")
    argv = ["edit", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--prompt", "make it red",
            "--steps", "1", "--dtype", "float32", "--keep-size"]  # fmt: skip
    assert cli([*argv, "--out", str(tmp_path / "a.png"), "--mesh", "data=2,fsdp=4"]) == 0
    assert "mesh data=2,fsdp=4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli([*argv, "--out", str(tmp_path / "b.png"), "--mesh", "fsdp=3"])
    assert e.value.code == 2 and "does not use exactly the 8 devices" in capsys.readouterr().err
    bad = tmp_path / "model"
    shutil.copytree(folder, bad)
    desc = json.loads((bad / "jaxedit.json").read_text())
    desc.setdefault("pipeline", {})["mesh"] = "fsdp=3,tensor=x"
    (bad / "jaxedit.json").write_text(json.dumps(desc))
    argv[2] = str(bad)
    with pytest.raises(SystemExit) as e:
        cli([*argv, "--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "jaxedit.json: pipeline.mesh is 'fsdp=3,tensor=x'" in err, err
    desc["pipeline"]["mesh"] = "fsdp=3"  # well-formed, but not for 8 devices: said when it is placed
    (bad / "jaxedit.json").write_text(json.dumps(desc))
    with pytest.raises(SystemExit) as e:
        cli([*argv, "--out", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "jaxedit.json: pipeline.mesh: mesh fsdp=3 does not use exactly the 8" in err, err


def test_training_mesh_auto_is_hybrid_fsdp():
    """A training run's mesh "auto": the state sharded within the smallest group of chips holding it in 40% of
    a chip, data parallel across groups (the compiled v5p-64 step: data=4,fsdp=8 at 2.49 s against fsdp=32's
    5.73 s at the same batch)."""
    import dataclasses

    from jaxedit.train.config import TrainConfig
    from jaxedit.train.loop import train_mesh
    from jaxedit.train.lora import LoraConfig

    state = 16 * 11.9e9  # float32 parameters, gradients, Adam m and v
    assert placement.train_rule(32, state, 95e9) == MeshConfig(data=4, fsdp=8)  # v5p-64
    assert placement.train_rule(4, state, 95e9) == MeshConfig(data=1, fsdp=4)  # v5p-8: every chip
    assert placement.train_rule(64, state, 32e9) == MeshConfig(data=4, fsdp=16)  # v6e-64
    assert placement.train_rule(256, state, 16e9) == MeshConfig(data=8, fsdp=32)  # v5e-256
    assert placement.train_rule(8, state, None) == MeshConfig(data=1, fsdp=8)  # memory unknown: all chips
    preset, devices = presets.get("flux-kontext-dev"), jax.devices()
    cfg = dataclasses.replace(TrainConfig(), mesh="auto")
    assert train_mesh(cfg, preset, devices, memory=200e9) == MeshConfig(data=2, fsdp=4)  # 190 GB / 4 <= 80
    lora = dataclasses.replace(cfg, lora=LoraConfig(rank=16))
    assert train_mesh(lora, preset, devices, memory=95e9) == MeshConfig(data=4, fsdp=2)  # frozen f32 base
    assert train_mesh(dataclasses.replace(cfg, mesh="fsdp=-1"), preset, devices) == MeshConfig(fsdp=-1)
