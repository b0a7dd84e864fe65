"""LoRA training (jaxedit.train.lora): merge and its gradient, adapter-only training. Its PEFT export loaded
by diffusers' FluxKontextPipeline.load_lora_weights and by our own LoRA reader: tests/test_lora_formats.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxedit import configs, presets
from jaxedit.parallel import sharding as sh
from jaxedit.train.lora import ALL_TARGETS, LoraConfig, init_lora, merge
from jaxedit.train.objective import ObjectiveConfig
from jaxedit.train.optim import OptimConfig
from jaxedit.train.step import Trainer
from tests.helpers import rel_err
from tests.test_train_objective import make_batch, random_params

CFG = presets.get("flux-kontext-tiny").transformer


def random_lora(params, cfg: LoraConfig, seed: int = 0, b_scale: float = 1.0):
    """Adapters with a AND b random (init_lora's b = 0 would hide any layout error)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_lora(params, cfg, jax.random.key(0)))
    return jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) * b_scale / math.sqrt(s.shape[1])).astype(np.float32), shapes
    )


def fused(tree, name: str) -> np.ndarray:
    """A target's weight as one [layers, in, out] matrix, assembled here from the model's layout."""
    blk = tree["single_blocks" if name.startswith("linear") else "double_blocks"]
    flat = lambda x: np.asarray(x["kernel"], np.float64).reshape(*x["kernel"].shape[:2], -1)  # noqa: E731
    if name == "linear1":  # [qkv | mlp] on the output axis
        return np.concatenate([flat(blk["linear1_qkv"]), flat(blk["linear1_mlp"])], axis=2)
    if name == "linear2":  # [attn ; mlp] on the input axis
        return np.concatenate([flat(blk["linear2_attn"]), flat(blk["linear2_mlp"])], axis=1)
    mod, sub = name.split(".")
    return flat(blk[mod][sub])


def test_merge_identity_and_gradient_chain_rule():
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("img_attn.qkv", "nope"))
    cfg = LoraConfig(rank=3, alpha=5.0)
    params = random_params()
    zero_b = init_lora(params, cfg, jax.random.key(1))
    assert zero_b["double_blocks"]["img_attn"]["qkv"]["a"].shape == (CFG.depth, CFG.hidden_size, 3)
    assert zero_b["single_blocks"]["linear2"]["a"].shape == (CFG.depth_single_blocks, 5 * CFG.hidden_size, 3)
    assert zero_b["single_blocks"]["linear1"]["b"].shape == (CFG.depth_single_blocks, 3, 7 * CFG.hidden_size)
    same = traverse_util.flatten_dict(merge(params, zero_b, cfg))
    for path, leaf in traverse_util.flatten_dict(params).items():
        assert np.array_equal(np.asarray(same[path]), leaf), path

    lora = random_lora(params, cfg)
    # a smooth loss of every parameter: L = sum(c * sin(p)), so dL/dW = c * cos(W) everywhere
    rng = np.random.default_rng(3)
    c = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    loss = lambda p: sum(jnp.sum(ci * jnp.sin(pi)) for ci, pi in zip(jax.tree.leaves(c), jax.tree.leaves(p)))  # noqa: E731

    @jax.jit
    def grads(params, lora):
        merged = merge(params, lora, cfg)
        return merged, jax.grad(loss)(merged), jax.grad(lambda lo: loss(merge(params, lo, cfg)))(lora)

    merged, g_w, g_lora = grads(params, lora)
    for name in ALL_TARGETS:
        blk = "single_blocks" if name.startswith("linear") else "double_blocks"
        node = lora[blk]
        for k in name.split("."):
            node = node[k]
        a, b = np.asarray(node["a"], np.float64), np.asarray(node["b"], np.float64)
        # merge: W + (alpha / r) a @ b on the fused matrix
        want = fused(params, name) + cfg.scale * a @ b
        np.testing.assert_allclose(fused(merged, name), want, rtol=1e-6, atol=1e-6, err_msg=name)
        # chain rule through W = W0 + s a b: dL/da = s G b^T, dL/db = s a^T G with G = dL/dW
        gw = fused(g_w, name)
        gl = g_lora[blk]
        for k in name.split("."):
            gl = gl[k]
        ga, gb = cfg.scale * gw @ b.transpose(0, 2, 1), cfg.scale * a.transpose(0, 2, 1) @ gw
        assert np.abs(ga).max() > 0 and np.abs(gb).max() > 0, name
        assert rel_err(gl["a"], ga) < 1e-5 and rel_err(gl["b"], gb) < 1e-5, name


def test_trainer_step_trains_only_the_adapters():
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("img_attn.qkv", "txt_mlp.2", "linear1", "linear2"))
    opt = OptimConfig(lr=1e-2, weight_decay=0.1, ema_decay=0.9)
    mesh = sh.make_mesh(configs.MeshConfig(fsdp=2), jax.devices()[:2])
    trainer = Trainer(CFG, ObjectiveConfig(guidance=(1.0, 4.0)), opt, 10, mesh, dtype=jnp.float32, lora=lcfg)
    params, batch = random_params(), make_batch()
    state = trainer.init_state(params, jax.random.key(4))
    assert set(state) == {"step", "base", "lora", "opt_state", "ema"}
    assert state["base"]["double_blocks"]["img_attn"]["qkv"]["kernel"].sharding.spec[1] == "fsdp"
    # the optimizer holds moments of the adapters only
    n_lora = sum(x.size for x in jax.tree.leaves(state["lora"]))
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * n_lora + 10
    lora0 = jax.tree.map(np.asarray, state["lora"])
    assert not any(np.any(x) for x in jax.tree.leaves(lora0["double_blocks"]["img_attn"]["qkv"]["b"]))
    for _ in range(2):
        state, metrics = trainer.step(state, {k: v[None] for k, v in batch.items()}, jax.random.key(7))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    for path, leaf in traverse_util.flatten_dict(params).items():
        assert np.array_equal(np.asarray(traverse_util.flatten_dict(state["base"])[path]), leaf), path
    for path, leaf in traverse_util.flatten_dict(lora0).items():  # step 1 moves b (a's grad is 0), step 2 a
        assert not np.allclose(np.asarray(traverse_util.flatten_dict(state["lora"])[path]), leaf), path
    merged = trainer.model_params(state)
    assert not np.allclose(
        merged["single_blocks"]["linear2_mlp"]["kernel"], params["single_blocks"]["linear2_mlp"]["kernel"]
    )
    assert np.array_equal(merged["img_in"]["kernel"], params["img_in"]["kernel"])


def test_checked_in_dev_configs_load():
    from pathlib import Path

    from jaxedit.train.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    lora = load_config(root / "kontext_dev_lora.py", ["lora.rank=32", 'lora.targets=["linear1", "linear2"]'])
    assert lora.lora == LoraConfig(rank=32, alpha=16.0, targets=("linear1", "linear2"))
    full = load_config(root / "kontext_dev_full.py")
    assert full.lora is None and full.model == lora.model
