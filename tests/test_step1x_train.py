"""Step1X-Edit training: the flow-matching loss and gradient against a reference written here, the
connector's t in [0, 1] (scaled by 1000 once, not the double-scaled t of S1X issue #91), and a short
`jaxedit.train.loop.train` run of configs/step1x_tiny.py on a tiny model folder with a tiny Qwen2.5-VL.

The reference packs with numpy loops (tests.test_train_objective), gives the reference tokens the
target's ids (first coordinate 0), and runs the model from its parts: the connector's pooled vector in
numpy, its token refiner (`connector.S`) called with 1000 t explicitly, then the FLUX DiT with t.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit.models import Flux
from jaxedit.models.connector import SingleTokenRefiner
from jaxedit.models.step1x import Step1XEdit
from jaxedit.train.objective import ObjectiveConfig, draw
from jaxedit.train.optim import OptimConfig
from jaxedit.train.step import Trainer
from tests.helpers import rel_err
from tests.test_train_data import write_dataset
from tests.test_train_objective import ref_ids, ref_pack
from tests.tiny_step1x import PRESET, random_params

CFG, CCFG = PRESET.transformer, PRESET.connector
B, H, W, L = 4, 4, 6, 7  # target and reference latents 4x6 (6 tokens each), 7 Qwen tokens
VALID = (7, 3, 5, 1)  # valid (prefix) Qwen tokens per item
EMPTY_VALID = (2, 4, 1, 3)
ROOT = Path(__file__).resolve().parents[1]
# XLA's CPU backend without LLVM optimisation: these tiny gradients compile 2-3x faster, same numbers
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_compiled_fast(f, *args):
    return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def prefix_mask(lengths) -> np.ndarray:
    return (np.arange(L)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def make_batch(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask, empty_mask = prefix_mask(VALID), prefix_mask(EMPTY_VALID)
    return {
        "target": rng.standard_normal((B, H, W, 16)).astype(np.float32),
        "reference": rng.standard_normal((B, H, W, 16)).astype(np.float32),
        "txt": (rng.standard_normal((B, L, CCFG.in_channels)) * mask[..., None]).astype(np.float32),
        "txt_mask": mask,
        "empty_txt": (rng.standard_normal((B, L, CCFG.in_channels)) * empty_mask[..., None]).astype(np.float32),
        "empty_mask": empty_mask,
    }


def reference_model(params, img, ids, llm, mask, t, connector_t):
    """Step1X-Edit from its parts: pooled y = global_proj_out(masked_mean(llm) (1 + scale_factor)), txt =
    the token refiner at `connector_t`, then the DiT (no guidance) at t."""
    conn = params["connector"]
    m = mask[..., None].astype(jnp.float32)
    mean = (llm * m).sum(1) / m.sum(1)
    y = (mean * (1 + conn["scale_factor"])) @ conn["global_proj_out"]["kernel"] + conn["global_proj_out"]["bias"]
    txt = SingleTokenRefiner(CCFG).apply({"params": conn["S"]}, llm, connector_t, mask)
    dit = {k: v for k, v in params.items() if k != "connector"}
    txt_ids = jnp.zeros((*txt.shape[:2], 3), jnp.float32)
    return Flux(CFG).apply({"params": dit}, img, ids, txt, txt_ids, t, y, None)


def reference_inputs(batch, r):
    """Model inputs and velocity target of the spec from the draws r: x_t = (1 - t) x0 + t noise,
    v = noise - x0, tokens [target | reference] with EQUAL ids, dropped items get their empty prompt."""
    t, noise, drop = (np.asarray(r[k]) for k in ("t", "noise", "drop"))
    x0, tb = batch["target"], t[:, None, None, None]
    x_t = ref_pack(((1 - tb) * x0 + tb * noise).astype(np.float32))
    v = ref_pack((noise - x0).astype(np.float32))
    img = np.concatenate([x_t, ref_pack(batch["reference"])], axis=1)
    grid = ref_ids(H // 2, W // 2, 0.0)
    ids = np.broadcast_to(np.concatenate([grid, grid]), (B, 2 * len(grid), 3))
    llm = np.where(drop[:, None, None], batch["empty_txt"], batch["txt"])
    mask = np.where(drop[:, None], batch["empty_mask"], batch["txt_mask"])
    return img, ids, llm, mask, t, v


@jax.value_and_grad
def reference_loss(params, img, ids, llm, mask, t, v, weight):
    pred = reference_model(params, img, ids, llm, mask, t, 1000.0 * t)[:, : v.shape[1]]
    return jnp.mean(weight * jnp.mean((pred - v) ** 2, axis=(1, 2)))


def test_loss_gradient_and_connector_timestep_match_reference():
    cfg = ObjectiveConfig(weighting="cosmap", shift=3.1582, ref_index=0.0, prompt_dropout=0.5)
    params, batch = random_params(PRESET, seed=3)["transformer"], make_batch()
    key = jax.random.key(3)
    r = draw(cfg, key, jnp.asarray(batch["target"]))
    assert 0 < np.asarray(r["drop"]).sum() < B  # both branches of the dropout are exercised
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    trainer = Trainer(CFG, cfg, OptimConfig(), 10, mesh, dtype=jnp.float32, connector=CCFG)
    assert isinstance(trainer.model, Step1XEdit) and "empty_txt" in trainer.batch_keys

    def ours(p):  # also records what the connector's t_embedder and the DiT's time_in receive
        seen = {}

        def record(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.name in ("t_embedder", "time_in"):
                seen[context.module.name] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            loss = trainer.loss(p, batch, key)[0]  # flow_matching_loss on the Trainer's Step1XEdit
        return loss, seen

    (loss, seen), grads = run_compiled_fast(jax.value_and_grad(ours, has_aux=True), params)
    img, ids, llm, mask, t, v = reference_inputs(batch, r)
    weight = (2 / (np.pi * (1 - 2 * t + 2 * t * t))).astype(np.float32)
    ref_loss, ref_grads = run_compiled_fast(reference_loss, params, img, ids, llm, mask, t, v, weight)
    assert float(loss) > 0
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    assert np.linalg.norm(flat(ref_grads["connector"])) > 0  # the connector trains
    assert rel_err(flat(grads), flat(ref_grads)) < 1e-5

    # t in (0, 1); the sinusoid both time embedders receive is that of 1000 t (BFL / S1X frequencies)
    assert 0 < t.min() and t.max() < 1
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    expected = np.concatenate([np.cos(1000 * t[:, None] * freqs), np.sin(1000 * t[:, None] * freqs)], axis=1)
    for name in ("t_embedder", "time_in"):
        np.testing.assert_allclose(np.asarray(seen[name]), expected, atol=2e-4, err_msg=name)


def test_trainer_needs_equal_reference_ids():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match="ref_index=0"):
        Trainer(CFG, ObjectiveConfig(), OptimConfig(), 10, mesh, connector=CCFG)


@pytest.mark.slow  # about 80 s of CPU: the sharded train step's compilation dominates
def test_tiny_training_run(tmp_path, tiny_qwen):
    """`python -m train --config configs/step1x_tiny.py` (2 devices, 2 micro-batches): Qwen cached per
    item, VAE, sharded steps, checkpoints, the trained DiT and connector exported to the model folder."""
    from jaxedit.checkpoint import load_params
    from tests.tiny_step1x import make_tiny_step1x

    model = make_tiny_step1x(tmp_path / "model", *tiny_qwen)
    before = load_params(model / "transformer")
    data = write_dataset(tmp_path / "data", n_square=8, n_wide=0, bad=False)
    ckpt = tmp_path / "ckpt"
    sets = [f"model={model}", f"data.path={data}", f"checkpoint_dir={ckpt}", "steps=4", "checkpoint_every=2"]
    sets += ["sample_every=4", "sample_count=2"]
    cmd = [sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "step1x_tiny.py")]
    flags = ["--xla_force_host_platform_device_count=2"] + [f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items()]
    env = os.environ | {"XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [*cmd, *[a for x in [*sets, "export_model=true"] for a in ("--set", x)]],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    recs = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in recs]
    assert [x["step"] for x in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(losses)) and all(x["grad_norm"] > 0 for x in recs)
    assert np.mean(losses[2:]) < np.mean(losses[:2])  # the same 8 pairs every 2 steps: it learns
    assert sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit()) == [2, 4]
    # each item's instruction and its ("", image) went through Qwen2.5-VL once
    assert len(list((ckpt / "qwen_cache").glob("*.npz"))) == 16
    assert (ckpt / "samples" / "step_0000004.png").is_file()  # sample edits with the run's Qwen and weights
    after = load_params(model / "transformer")  # the EMA of the trained weights
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), before, after)
    assert min(jax.tree.leaves(moved["connector"])) > 0 and min(jax.tree.leaves(moved["double_blocks"])) > 0


def test_precompute_fills_the_qwen_cache_training_reads(tmp_path, tiny_qwen):
    """`train.precompute` on a Step1X-Edit folder: the JAX Qwen2.5-VL (weights sharded data=4 x fsdp=2, items
    in batches of 4) writes one file per item and per item's empty prompt, under the names training's encoder
    looks up (its bucket-sized source image), each as the unsharded embedder computes it."""
    from PIL import Image

    from jaxedit.step1x.text import load_embedding, load_qwen_embedder
    from jaxedit.train.data import DataConfig, index_manifest, load_image
    from jaxedit.train.precompute import main
    from tests.tiny_step1x import make_tiny_step1x

    model = make_tiny_step1x(tmp_path / "model", *tiny_qwen)
    data = write_dataset(tmp_path / "data", n_square=3, n_wide=2, bad=False)
    cache = tmp_path / "cache"
    args = ["--model", str(model), "--data", str(data), "--out", str(cache), "--batch", "4", "--mesh", "data=4,fsdp=2"]
    assert main(args) == 0
    one = load_qwen_embedder(model)
    index = index_manifest(DataConfig(path=str(data)))
    assert len(list(cache.glob("*.npz"))) == 2 * len(index.items)
    for it in index.items[:2]:
        pixels = np.round((load_image(it.source, index.buckets[it.bucket]) + 1.0) * 127.5).astype(np.uint8)
        image = Image.fromarray(pixels)  # as training's Step1XEncoder turns its batch back into images
        for prompt in (it.instruction, ""):
            emb, mask = load_embedding(cache / f"{one.cache_key(prompt, image)}.npz")
            want, want_mask = one.encode([prompt], [image])
            np.testing.assert_array_equal(mask, want_mask[0])
            assert rel_err(emb, want[0]) <= 2e-2  # bfloat16 both, sharded sums reordered
