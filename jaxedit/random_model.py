"""Write a model folder with RANDOM weights for a preset (placeholder model, smoke tests).

    python -m jaxedit.random_model models/default --preset flux-kontext-tiny

Parameters come from each module's own initialiser (seeded), with the zero-initialised
gates and output layers perturbed so the network is not an identity map; tokenizers are
trained offline on a few sentences. The edits it makes are noise: it exists so the
pipeline, CLI and docs have a model folder to run before a trained one is available.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxedit import configs
from jaxedit.checkpoint import save_params
from jaxedit.model_folder import write_description
from jaxedit.tokenizers_offline import train_tokenizers


def random_params(preset: configs.Preset, seed: int = 0) -> dict:
    from jaxedit.models import AutoEncoder, CLIPTextModel, Flux, T5Encoder

    cfg = preset.transformer
    key = jax.random.key(seed)
    b, l = 1, 4
    flux_args = (
        jnp.zeros((b, l, cfg.in_channels)), jnp.zeros((b, l, 3)), jnp.zeros((b, l, cfg.context_in_dim)),
        jnp.zeros((b, l, 3)), jnp.zeros((b,)), jnp.zeros((b, cfg.vec_in_dim)),
        jnp.zeros((b,)) if cfg.guidance_embed else None,
    )  # fmt: skip
    ids = jnp.zeros((b, 8), jnp.int32)
    modules = {
        "transformer": (Flux(cfg), flux_args),
        "vae": (AutoEncoder(preset.vae), (jnp.zeros((b, 16, 16, 3)),)),
        "t5": (T5Encoder(preset.t5), (ids,)),
        "clip": (CLIPTextModel(preset.clip), (ids,)),
    }
    out = {}
    for i, (part, (module, args)) in enumerate(modules.items()):
        params = jax.jit(module.init)(jax.random.fold_in(key, i), *args)["params"]
        params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 100 + i), len(leaves))
        out[part] = tree.unflatten([p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
    return out


def make_random_model(out: str | Path, preset_name: str = "flux-kontext-tiny", seed: int = 0) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    preset = configs.get(preset_name)
    for part, params in random_params(preset, seed).items():
        save_params(out / part, params)
    train_tokenizers(out)
    write_description(out, preset, {"auto_resize": False, "steps": 8, "guidance": 2.5, "random_weights": True})
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m jaxedit.random_model", description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--preset", default="flux-kontext-tiny", choices=configs.names())
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"wrote random-weight model folder {make_random_model(args.out, args.preset, args.seed)}")


if __name__ == "__main__":
    main()
