"""Qwen-Image-Edit training on jaxedit's train step (`jaxedit.train.step.Trainer`) with a tiny model on CPU.

The family's conditioning drives the loss: Qwen2.5-VL states and mask, t in [0, 1] (the pipeline's sigma, the
Euler step's v = noise - x0), the static img_shapes of the target and each reference (here two references of
other sizes than the target's), references packed after the target, the loss on the target's tokens. Checked:
the loss equals a numpy recomputation of the objective's formula around our model's forward; the step's first
loss is that loss; scanned and unrolled blocks agree; ten steps on one batch lower the loss (full and LoRA).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import families, presets
from jaxedit.models.qwen_image import QwenImageTransformer
from jaxedit.train.lora import LoraConfig
from jaxedit.train.objective import ObjectiveConfig, draw
from jaxedit.train.optim import OptimConfig
from jaxedit.train.step import Trainer
from tests.test_qwen_image_folder import release  # noqa: F401 (a fixture)
from tests.test_train_objective import ref_pack

PRESET = presets.get("qwen-image-edit-tiny")
CFG = PRESET.transformer
B, L = 2, 5  # items, Qwen tokens
TARGET, REFS = (4, 6), ((4, 4), (2, 6))  # latent cells (h, w) of the target and the two references
VALID, EMPTY_VALID = (5, 3), (2, 4)


def random_params(cfg=CFG, seed: int = 0) -> dict:
    """Random float32 parameters (numpy; no init compiled): norm weights ~1, kernels and biases ~0.05."""
    rng = np.random.default_rng(seed)
    shapes = families.of(PRESET).abstract_params(dataclasses.replace(PRESET, transformer=cfg), "transformer")
    draw_ = lambda path, s: (  # noqa: E731
        1 + 0.1 * rng.standard_normal(s.shape) if path[-1].key == "weight" else 0.05 * rng.standard_normal(s.shape)
    ).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw_, shapes)


def prefix_mask(lengths) -> np.ndarray:
    return (np.arange(L)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def make_batch(seed: int = 1, dropout: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = lambda hw: rng.standard_normal((B, *hw, 16)).astype(np.float32)  # noqa: E731
    d = CFG.joint_attention_dim
    out = {"target": z(TARGET), "reference": z(REFS[0]), "reference_1": z(REFS[1])}
    out |= {"txt": rng.standard_normal((B, L, d)).astype(np.float32), "txt_mask": prefix_mask(VALID)}
    if dropout:
        out |= {"empty_txt": rng.standard_normal((B, L, d)).astype(np.float32), "empty_mask": prefix_mask(EMPTY_VALID)}
    return out


def mesh():
    return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def numpy_loss(params, batch, r, cfg=CFG) -> float:
    """The objective's formula in numpy around our model's forward: x_t = (1 - t) x0 + t noise, v = noise - x0,
    tokens [target | reference | reference_1] at img_shapes ((1, 2, 3), (1, 2, 2), (1, 1, 3)), a dropped item
    its empty prompt, loss = mean over items of the mean squared error on the target's tokens (float64)."""
    t, noise, drop = (np.asarray(r[k]) for k in ("t", "noise", "drop"))
    x0, tb = batch["target"], t[:, None, None, None]
    x_t = ref_pack(((1 - tb) * x0 + tb * noise).astype(np.float32))
    v = ref_pack((noise - x0).astype(np.float32))
    img = np.concatenate([x_t, ref_pack(batch["reference"]), ref_pack(batch["reference_1"])], axis=1)
    txt, mask = batch["txt"], batch["txt_mask"]
    if "empty_txt" in batch:
        txt = np.where(drop[:, None, None], batch["empty_txt"], txt)
        mask = np.where(drop[:, None], batch["empty_mask"], mask)
    shapes = tuple((1, h // 2, w // 2) for h, w in (TARGET, *REFS))
    pred = QwenImageTransformer(cfg).apply({"params": params}, img, txt, mask, t, shapes)
    pred = np.asarray(pred, np.float64)[:, : x_t.shape[1]]
    return float(np.mean(np.mean((pred - v) ** 2, axis=(1, 2))))


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511"])
def test_loss_is_the_objective_around_our_forward(zero_cond_t):
    cfg = dataclasses.replace(CFG, zero_cond_t=zero_cond_t)
    objective = ObjectiveConfig(prompt_dropout=0.5, shift=3.0)
    params, batch = random_params(cfg, seed=3), make_batch(dropout=True)
    key = jax.random.key(4)
    r = draw(objective, key, jnp.asarray(batch["target"]))
    assert 0 < np.asarray(r["drop"]).sum() < B  # both branches of the dropout
    trainer = Trainer(cfg, objective, OptimConfig(), 10, mesh(), dtype=jnp.float32)
    assert isinstance(trainer.model, QwenImageTransformer)
    assert trainer.batch_keys == ("target", "reference", "txt", "txt_mask", "empty_txt", "empty_mask")
    loss = float(jax.jit(lambda p, b: trainer.loss(p, b, key)[0])(params, batch))
    want = numpy_loss(params, batch, r, cfg)
    print(f"zero_cond_t={zero_cond_t}: loss {loss:.7f}, numpy {want:.7f}, rel {abs(loss - want) / want:.1e}")
    assert loss > 0 and abs(loss - want) <= 1e-6 * want


def test_scan_and_unrolled_blocks_give_the_same_loss():
    objective = ObjectiveConfig()
    params, batch, key = random_params(seed=5), make_batch(seed=2), jax.random.key(6)
    losses = []
    for scan in (True, False):
        trainer = Trainer(CFG, objective, OptimConfig(), 10, mesh(), dtype=jnp.float32, scan_layers=scan)
        losses.append(float(jax.jit(lambda p, b, t=trainer: t.loss(p, b, key)[0])(params, batch)))
    print(f"scan {losses[0]:.8f}, unrolled {losses[1]:.8f}")
    assert abs(losses[0] - losses[1]) <= 1e-6 * losses[0]


@pytest.mark.parametrize("lora", [None, LoraConfig(rank=4, alpha=8.0)], ids=["full", "lora"])
def test_ten_steps_lower_the_loss(lora):
    """The step's first loss is the loss at (fold_in(fold_in(key, 0), 0)); ten Adam steps on one batch lower the
    loss's mean over 8 fixed draws."""
    objective = ObjectiveConfig(timestep="uniform")
    params, batch = random_params(seed=7), make_batch(seed=8)
    optim = OptimConfig(lr=3e-3 if lora is None else 3e-2)
    trainer = Trainer(CFG, objective, optim, 10, mesh(), dtype=jnp.float32, lora=lora)
    key, probes = jax.random.key(9), jax.random.split(jax.random.key(10), 8)
    loss_at = jax.jit(lambda p, k: trainer.loss(p, batch, k)[0])
    mean_loss = jax.jit(lambda p: jnp.mean(jax.lax.map(lambda k: trainer.loss(p, batch, k)[0], probes)))
    first = float(loss_at(params, jax.random.fold_in(jax.random.fold_in(key, 0), 0)))
    before = float(mean_loss(params))
    state = trainer.init_state(params)
    host = {k: v[None] for k, v in batch.items()}  # one micro-batch
    losses = []
    for _ in range(10):
        state, metrics = trainer.step(state, host, key)
        losses.append(float(metrics["loss"]))
    after = float(mean_loss(trainer.model_params(state)))
    name = "full" if lora is None else "lora"
    print(f"{name}: step losses {np.round(losses, 4).tolist()}; 8 fixed draws {before:.4f} -> {after:.4f}")
    assert abs(losses[0] - first) <= 1e-5 * first
    assert np.isfinite(losses).all() and after < (0.9 if lora is None else 0.95) * before


def test_exported_lora_loads_in_diffusers_and_matches_our_merge(tmp_path):
    """Adapters on every target (a and b random: a trained adapter's tree; b = 0 would hide layout errors),
    exported in diffusers' layout, loaded by `QwenImageEditPlusPipeline.load_lora_weights` into the tiny diffusers
    transformer our parameters are converted from: its forward equals ours on merge(params, lora)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from safetensors.numpy import load_file

    from checkpoints_convert.qwen_image import load_qwen_image_transformer
    from jaxedit.configs import QwenImageConfig
    from jaxedit.train.lora import export_peft, init_lora, merge
    from references.qwen_image import qwen_image_transformer
    from tests.helpers import rel_err
    from tests.test_qwen_image import LAYOUTS, make_inputs, run_reference

    cfg = QwenImageConfig.tiny(zero_cond_t=True)
    preset = dataclasses.replace(PRESET, transformer=cfg)
    model = qwen_image_transformer(cfg, seed=12)
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    params = load_qwen_image_transformer(tmp_path / "transformer", cfg)
    table = families.of(preset).lora_targets()
    lcfg = LoraConfig(rank=3, alpha=5.0)  # scale 5/3: folded into lora_B
    rng = np.random.default_rng(13)
    shapes = jax.eval_shape(lambda: init_lora(params, lcfg, jax.random.key(0), table))
    lora = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.3 / s.shape[1] ** 0.5).astype(np.float32), shapes)

    path = export_peft(lora, lcfg, preset, tmp_path / "lora.safetensors")
    sd = load_file(path)
    assert len(sd) == 2 * cfg.num_layers * 12  # 8 attention + 4 MLP Linears per block, A and B
    assert sd["transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight"].shape == (3, cfg.hidden_size)
    assert sd["transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_B.weight"].shape == (cfg.mlp_hidden_dim, 3)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = make_inputs(cfg, LAYOUTS["two_refs"])
        base = run_reference(model, x)
        pipe = diffusers.QwenImageEditPlusPipeline(
            scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=model
        )
        pipe.load_lora_weights(path, adapter_name="jaxedit", use_safetensors=True)
        assert sum(".lora_A." in k for k in model.state_dict()) == len(sd) // 2  # every module took its LoRA
        want = run_reference(model, x)
    finally:
        torch.set_num_threads(threads)
    args = (x["img"], x["txt"], np.asarray(x["mask"], np.int32), x["timesteps"], x["img_shapes"])
    got = QwenImageTransformer(cfg).apply({"params": merge(params, lora, lcfg, table)}, *args)
    err, effect = rel_err(got, want), rel_err(want, base)
    print(f"exported LoRA in diffusers vs our merge: rel err {err:.1e} (LoRA effect {effect:.2f})")
    assert err <= 1e-5 and effect > 1e-2


@pytest.mark.parametrize("task", ["lora", pytest.param("train", marks=pytest.mark.slow)])
def test_plan_lowers_and_compiles_the_train_step(task):
    """`jaxedit.plan --task train / lora` on two simulated CPU devices: two references, Qwen text tokens."""
    from jaxedit.plan import analytic_forward_flops
    from tests.test_plan import run_plan

    r = run_plan("--preset", "qwen-image-edit-tiny", "--task", task, "--mesh", "fsdp=2", "--resolution", "64",
                 "--batch", "2", "--text-tokens", "16", "--references", "2")  # fmt: skip
    assert r["chips"] == 2 and r["target"] == "cpu" and r["task"] == task
    assert (r["target_tokens"], r["reference_tokens"], r["tokens"]) == (16, 32, 64)
    assert r["arguments"] > 0 and r["temporaries"] > 0
    assert r["model_flops"] == 3 * 2 * analytic_forward_flops(CFG, 64)


def test_family_refuses_what_it_cannot_train():
    family = families.of(PRESET)
    with pytest.raises(ValueError, match="resolution_shift"):
        family.check_objective(ObjectiveConfig(resolution_shift=True))
    with pytest.raises(ValueError, match="no guidance embedding"):
        family.check_objective(ObjectiveConfig(guidance=(1.0, 4.0)))
    with pytest.raises(ValueError, match="img_attn.qkv are not this model's"):  # a FLUX target
        Trainer(CFG, ObjectiveConfig(), OptimConfig(), 10, mesh(), lora=LoraConfig(targets=("img_attn.qkv",)))


@pytest.mark.slow  # a tiny release converted, then a sharded train step compiled on 2 CPU devices
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_tiny_training_run(release, tmp_path, lora):  # noqa: F811 (the release fixture)
    """`python -m train --config configs/qwen_image_tiny.py` on a converted tiny release (2 devices, 2
    micro-batches, items of one and of two sources): Qwen2.5-VL cached per item, VAE latents, sharded steps,
    checkpoints; full: the trained DiT exported to the model folder; LoRA: the adapters in diffusers' layout."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.numpy import load_file

    from checkpoints_convert.__main__ import main as convert
    from jaxedit.checkpoint import load_params
    from tests.test_train_data import write_dataset

    root = Path(__file__).resolve().parents[1]
    model = tmp_path / "model"
    assert convert(["pipeline", str(release), str(model), "--preset", "qwen-image-edit-tiny"]) == 0
    data = write_dataset(tmp_path / "data", n_square=4, n_wide=1, bad=False, n_multi=4)
    before = load_params(model / "transformer")
    ckpt = tmp_path / "ckpt"
    sets = [f"model={model}", f"data.path={data}", f"checkpoint_dir={ckpt}", "steps=4", "checkpoint_every=2"]
    sets += ["lora={}", "lora.rank=4", "optim.lr=1e-2"] if lora else ["export_model=true"]
    cmd = [sys.executable, "-m", "train", "--config", str(root / "configs" / "qwen_image_tiny.py")]
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = os.environ | {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    run = subprocess.run([*cmd, *[a for x in sets for a in ("--set", x)]], env=env, cwd=root, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    recs = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs]
    print(f"{'lora' if lora else 'full'} run losses: {np.round(losses, 4).tolist()}")
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(losses)) and all(x["grad_norm"] > 0 for x in recs)
    assert sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit()) == [2, 4]
    assert len(list((ckpt / "qwen_cache").glob("*.npz"))) >= 8  # each item's (instruction, references)
    if lora:
        sd = load_file(ckpt / "lora.safetensors")
        assert "transformer.transformer_blocks.1.attn.add_k_proj.lora_B.weight" in sd and len(sd) == 2 * 2 * 12
        assert max(np.abs(v).max() for k, v in sd.items() if "lora_B" in k) > 0  # trained from b = 0
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), before,
                         load_params(model / "transformer"))  # fmt: skip
    if lora:  # the folder's weights untouched
        assert max(jax.tree.leaves(moved)) == 0
    else:  # every weight trained and exported
        assert min(jax.tree.leaves(moved)) > 0
