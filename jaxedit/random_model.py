"""Write a model folder with RANDOM weights for a preset (placeholder model, smoke tests).

    python -m jaxedit.random_model models/default --preset flux-kontext-tiny

Parameters come from each module's own initialiser (seeded), with the zero-initialised
gates and output layers perturbed so the network is not an identity map; tokenizers are
trained offline on a few sentences. The edits it makes are noise: it exists so the
pipeline, CLI and docs have a model folder to run before a trained one is available.
"""

from __future__ import annotations

import argparse
import json
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
    if preset.connector is not None:  # Step1X-Edit: the DiT fed by the Qwen2 connector
        from jaxedit.models.step1x import Step1XEdit

        llm = (jnp.zeros((b, l, preset.connector.in_channels)), jnp.ones((b, l), jnp.int32))
        transformer = (Step1XEdit(cfg, connector_cfg=preset.connector), (*flux_args[:2], *llm, flux_args[4]))
    else:
        transformer = (Flux(cfg), flux_args)
    modules = {
        "transformer": transformer,
        "vae": (AutoEncoder(preset.vae), (jnp.zeros((b, 16, 16, 3)),)),
        "t5": (T5Encoder(preset.t5), (ids,)) if preset.t5 is not None else None,
        "clip": (CLIPTextModel(preset.clip), (ids,)) if preset.clip is not None else None,
    }
    modules = {k: v for k, v in modules.items() if v is not None}  # Step1X-Edit has no T5 / CLIP
    out = {}
    for i, (part, (module, args)) in enumerate(modules.items()):
        params = jax.jit(module.init)(jax.random.fold_in(key, i), *args)["params"]
        params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 100 + i), len(leaves))
        out[part] = tree.unflatten([p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
    return out


RANDOM_OPTIONS = {"auto_resize": False, "steps": 8, "guidance": 2.5, "random_weights": True}


def make_random_model(
    out: str | Path,
    preset_name: str = "flux-kontext-tiny",
    seed: int = 0,
    *,
    vocabulary: str = "default",
    options: dict | None = None,
) -> Path:
    """A model folder with random weights; tokenizers trained on `vocabulary` (default | shapes).

    The starting point of a model trained with jaxedit: `python -m train` then trains its VAE
    and transformer in place (its text encoders stay random and frozen).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    preset = configs.get(preset_name)
    for part, params in random_params(preset, seed).items():
        save_params(out / part, params)
    if vocabulary == "shapes":
        from jaxedit.data.shapes import vocabulary as shapes_vocabulary

        train_tokenizers(out, shapes_vocabulary(), whole_words=True)
    elif vocabulary == "default":
        train_tokenizers(out)
    else:
        raise ValueError(f"vocabulary {vocabulary!r}: use 'default' or 'shapes'")
    write_description(out, preset, RANDOM_OPTIONS if options is None else options)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m jaxedit.random_model", description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--preset", default="flux-kontext-tiny", choices=configs.names())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocabulary", default="default", choices=["default", "shapes"], help="tokenizer training text")
    p.add_argument("--options", type=json.loads, default=None, help="pipeline defaults as JSON, e.g. '{\"steps\": 8}'")
    args = p.parse_args()
    folder = make_random_model(args.out, args.preset, args.seed, vocabulary=args.vocabulary, options=args.options)
    print(f"wrote random-weight model folder {folder}")


if __name__ == "__main__":
    main()
