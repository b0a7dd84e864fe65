"""The small DiT, data and SGD step shared by the sharding and multi-process tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxedit.configs import FluxConfig
from jaxedit.models import Flux
from jaxedit.parallel import sharding as sh

CFG = FluxConfig(
    context_in_dim=32, vec_in_dim=24, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6)
)
B, LT, LI, L_TARGET = 8, 8, 24, 12


def inputs(seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, LI, 3), np.float32)
    ids[:, :, 1] = np.arange(LI) // 4
    ids[:, :, 2] = np.arange(LI) % 4
    ids[:, L_TARGET:, 0] = 1
    return [
        rng.standard_normal((B, LI, 64)).astype(np.float32),
        ids,
        rng.standard_normal((B, LT, CFG.context_in_dim)).astype(np.float32),
        np.zeros((B, LT, 3), np.float32),
        rng.uniform(0, 1, B).astype(np.float32),
        rng.standard_normal((B, CFG.vec_in_dim)).astype(np.float32),
        np.full((B,), 3.0, np.float32),
    ]


def model_and_data():
    """(model, boxed abstract params, host params, inputs, target, optimizer): identical in every process."""
    model = Flux(CFG)
    args = inputs()
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    params = sh.unbox(jax.jit(model.init, backend="cpu")(jax.random.key(0), *args))["params"]
    leaves, tree = jax.tree.flatten(params)  # random everywhere: init zeroes gates and the output layer
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([np.asarray(p + 0.1 * jax.random.normal(k, p.shape)) for k, p in zip(keys, leaves)])
    target = np.random.default_rng(2).standard_normal((B, L_TARGET, 64)).astype(np.float32)
    # plain SGD: Adam's first step is ~lr * sign(grad), which turns 1e-7 gradient noise on
    # near-zero gradients into whole-lr differences and would test nothing about sharding
    return model, boxed, params, args, target, optax.sgd(0.1)


def train_step(model, opt):
    def loss_fn(params, args, target):
        out = model.apply({"params": params}, *args)[:, :L_TARGET]
        return jnp.mean((out - target) ** 2)

    def step(params, opt_state, args, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, args, target)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    return step


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
