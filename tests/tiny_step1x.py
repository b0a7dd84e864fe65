"""A tiny Step1X-Edit model folder with random weights (`step1x-edit-tiny`), written without
compiling an initialiser: shapes from `jax.eval_shape`, values drawn in numpy."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxedit import presets
from jaxedit.checkpoint import save_params
from jaxedit.model_folder import write_description
from jaxedit.step1x.text import qwen_entry

PRESET = presets.get("step1x-edit-tiny")


def random_tree(abstract, seed: int) -> dict:
    """Every leaf random, none zero or identity: kernels N(0, 1/fan_in), norm scales 1 + U(-0.5, 0.5),
    the rest N(0, 0.1)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if len(s.shape) >= 2:
            return (rng.standard_normal(s.shape) / np.sqrt(s.shape[-2])).astype(np.float32)
        if "scale" in name and "scale_factor" not in name:
            return (1 + rng.uniform(-0.5, 0.5, s.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def random_params(preset=PRESET, seed: int = 0) -> dict:
    from jaxedit.models import AutoEncoder
    from jaxedit.models.step1x import abstract_params

    vae = jax.eval_shape(lambda: AutoEncoder(preset.vae).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    vae = nn.meta.unbox(vae["params"])
    return {
        "transformer": random_tree(abstract_params(preset.transformer, preset.connector), seed),
        "vae": random_tree(vae, seed + 1),
    }


def make_tiny_step1x(folder: Path, qwen_path=None, qwen_config=None, seed: int = 0, options=None) -> Path:
    folder.mkdir(parents=True)
    for part, params in random_params(PRESET, seed).items():
        save_params(folder / part, params)
    write_description(folder, PRESET, options, extra=qwen_entry(None, qwen_config))
    if qwen_path is not None:  # the Qwen2.5-VL converted into the folder, as a user's would be
        from checkpoints_convert.pipeline import add_qwen

        add_qwen(folder, qwen_path, log=lambda *a: None)
    return folder
