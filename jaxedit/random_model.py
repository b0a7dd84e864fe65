"""Write a model folder with RANDOM weights for a preset (placeholder model, smoke tests).

    python -m jaxedit.random_model build/model --preset flux-kontext-tiny [--vocabulary sentences.txt --whole-words]

Parameters come from each module's own initialiser (seeded), with the zero-initialised
gates and output layers perturbed so the network is not an identity map; tokenizers are
trained offline on a few sentences. The edits it makes are noise: it exists so the
pipeline, CLI and docs have a model folder to run before a trained one is available.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax

from jaxedit import configs, families, presets
from jaxedit.checkpoint import save_params
from jaxedit.model_folder import write_description
from jaxedit.tokenizers_offline import train_tokenizers


def init(module, args: tuple, key):
    """module.init(key, *args), jitted over the key alone: `args` are constants of the program (static, e.g.
    Qwen-Image's img_shapes)."""
    return module.init(key, *args)


def random_params(preset: configs.Preset, seed: int = 0) -> dict:
    """{part: random parameters} of every part the preset's family has, each seeded by its position."""
    key, family = jax.random.key(seed), families.of(preset)
    modules = {p: (family.module(preset, p), family.example_inputs(preset, p)) for p in family.present_parts(preset)}
    out = {}
    for i, (part, (module, args)) in enumerate(modules.items()):
        params = jax.jit(functools.partial(init, module, args))(jax.random.fold_in(key, i))["params"]
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
    sentences: list[str] | None = None,
    whole_words: bool = False,
    options: dict | None = None,
) -> Path:
    """A model folder with random weights; its tokenizers are trained on `sentences` (default: a few built-in
    ones; whole_words: one token per word, for a small closed vocabulary such as a synthetic task's).

    The starting point of a model trained with jaxedit: `python -m train` then trains its VAE
    and transformer in place (its text encoders stay random and frozen).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    preset = presets.get(preset_name)
    for part, params in random_params(preset, seed).items():
        save_params(out / part, params)
    if sentences is None:
        train_tokenizers(out)
    else:
        train_tokenizers(out, sentences, whole_words=whole_words)
    extra = families.of(preset).description_extra(preset)  # e.g. Step1X-Edit's "qwen" entry (no folder yet)
    write_description(out, preset, RANDOM_OPTIONS if options is None else options, extra)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m jaxedit.random_model", description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--preset", default="flux-kontext-tiny", choices=presets.names())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocabulary", default=None, help="text file whose lines train the tokenizers (default: built-in)")
    p.add_argument("--whole-words", action="store_true", help="one token per word (a small closed vocabulary)")
    p.add_argument("--options", type=json.loads, default=None, help="pipeline defaults as JSON, e.g. '{\"steps\": 8}'")
    args = p.parse_args(argv)
    sentences = None
    if args.vocabulary:
        try:
            sentences = [s for s in Path(args.vocabulary).read_text().splitlines() if s.strip()]
        except OSError as e:
            p.error(f"--vocabulary: {e}")
    folder = make_random_model(
        args.out, args.preset, args.seed, sentences=sentences, whole_words=args.whole_words, options=args.options
    )
    print(f"wrote random-weight model folder {folder}")


if __name__ == "__main__":
    main()
