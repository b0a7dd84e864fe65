"""Cache text embeddings and VAE latents of a dataset, so training never runs the encoders.

    python -m train.precompute --model FOLDER --data DATA --out CACHE [--pixel-budget N --bucket-step S]

Then train with `--set data.cache=CACHE` (the same data.path, pixel_budget and bucket_step:
the cache is keyed by the indexed items and checked against them). CACHE holds
  cache.json                  model folder, manifest, item ids (index order), buckets
  txt.npy [N, Lt, D] y.npy [N, Dy]        text embeddings of each item's instruction
  empty_txt.npy empty_y.npy               the empty prompt's (prompt dropout)
  reference_WxH.npy target_WxH.npy        VAE latents (posterior mean) per bucket [n_b, H/8, W/8, C]
  rows.npy [N]                            each item's row in its bucket's arrays
Items of several sources are cached per group (`data.group_name`: target bucket and source buckets):
  target_G.npy reference_G.npy reference_1_G.npy ...   with G = WxH_from_W1xH1+W2xH2...

Step1X-Edit folders: CACHE gets each item's Qwen2.5-VL output of (instruction, source image at its
bucket size) and of ("", source image), one .npz per (prompt, image) as training's per-item cache
names them: train with `--set qwen_cache=CACHE`. The JAX Qwen2.5-VL runs `--batch` items at once,
its weights sharded over the local devices (`--mesh`, default every device on fsdp).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxedit import families, model_folder
from jaxedit.checkpoint import load_params
from jaxedit.kontext.encoder import KontextEncoder
from jaxedit.train.data import (
    CACHE_FILE,
    CACHED_PARTS,
    DataConfig,
    group_name,
    index_manifest,
    load_image,
    reference_key,
)


def precompute(model: str | Path, data: DataConfig, out: str | Path, batch: int = 64, mesh: str = "") -> Path:
    """The cache of the model folder's family (`jaxedit.families`: `precompute_text` or `precompute_qwen`)."""
    folder, out = Path(model), Path(out)
    preset = model_folder.read_description(folder)
    return families.of(preset).precompute(folder, preset, data, out, batch, mesh)


def precompute_text(folder: Path, preset, data: DataConfig, out: Path, batch: int = 64) -> Path:
    """FLUX.1 Kontext: T5 + CLIP embeddings and VAE latents of every item (a data.cache)."""
    model_folder.check_complete(folder, preset)
    parts = {p: load_params(folder / p) for p in ("vae", "t5", "clip")}
    encoder = KontextEncoder(folder, preset, parts, vae_sample=False)
    index = index_manifest(data)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    texts = sorted({it.instruction for it in index.items})
    tx, ty = [], []
    for i in range(0, len(texts), batch):
        txt, y = encoder.text.encode(texts[i : i + batch])
        tx.append(np.asarray(txt, np.float32))
        ty.append(np.asarray(y, np.float32))
    row_of = {t: i for i, t in enumerate(texts)}
    sel = np.array([row_of[it.instruction] for it in index.items])
    np.save(out / "txt.npy", np.concatenate(tx)[sel])
    np.save(out / "y.npy", np.concatenate(ty)[sel])
    etxt, ey = encoder.text.encode([""])
    np.save(out / "empty_txt.npy", np.asarray(etxt[0], np.float32))
    np.save(out / "empty_y.npy", np.asarray(ey[0], np.float32))

    rows = np.zeros(len(index.items), np.int64)
    for g in sorted({it.group for it in index.items}):  # target bucket, source buckets
        members = [k for k, it in enumerate(index.items) if it.group == g]
        lat = {"target": []} | {reference_key(j): [] for j in range(len(g[1]))}
        for i in range(0, len(members), batch):
            chunk = [index.items[k] for k in members[i : i + batch]]
            x = np.stack([load_image(it.target, index.buckets[g[0]]) for it in chunk])
            lat["target"].append(encoder.images(x))
            for j, b in enumerate(g[1]):
                x = np.stack([load_image(it.source_list()[j][0], index.buckets[b]) for it in chunk])
                lat[reference_key(j)].append(encoder.images(x))
        for name, arrays in lat.items():
            np.save(out / f"{name}_{group_name(index.buckets, g)}.npy", np.concatenate(arrays))
        rows[members] = np.arange(len(members))
    np.save(out / "rows.npy", rows)
    meta = {
        "model": str(folder.absolute()),
        "parts": model_folder.digest(folder, CACHED_PARTS),
        "manifest": str(Path(data.path).absolute()),
        "ids": [it.id for it in index.items],
        "buckets": [list(b) for b in index.buckets],
        "item_buckets": [it.bucket for it in index.items],
        "seconds": time.perf_counter() - t0,
    }
    (out / CACHE_FILE).write_text(json.dumps(meta))
    return out


QWEN_CACHE_FILE = "qwen_cache.json"  # a Step1X-Edit cache's summary (not a data.cache: training reads the .npz)


def precompute_qwen(folder: Path, data: DataConfig, out: Path, batch: int = 8, mesh: str = "") -> Path:
    """Step1X-Edit: the Qwen2.5-VL cache of every item (and its empty prompt), as training reads it."""
    from PIL import Image

    from jaxedit import configs
    from jaxedit.parallel import sharding as sh
    from jaxedit.step1x.text import load_qwen_embedder

    the_mesh = sh.make_mesh(configs.MeshConfig.parse(mesh or "fsdp=-1"))
    embedder = load_qwen_embedder(folder, mesh=the_mesh, batch_size=batch)
    index = index_manifest(data, max_sources=1)  # as Step1X-Edit training indexes it
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for b, size in enumerate(index.buckets):
        members = [it for it in index.items if it.bucket == b]
        for i in range(0, len(members), batch):
            chunk = members[i : i + batch]
            # the pixels training's encoder sees: the bucket-sized source, back to uint8
            pixels = [np.clip(np.round((load_image(it.source, size) + 1.0) * 127.5), 0, 255) for it in chunk]
            images = [Image.fromarray(x.astype(np.uint8)) for x in pixels]
            embedder.encode([it.instruction for it in chunk], images, cache_dir=out)
            embedder.encode([""] * len(chunk), images, cache_dir=out)
    meta = {"model": str(folder.absolute()), "manifest": str(Path(data.path).absolute()),
            "ids": [it.id for it in index.items], "seconds": time.perf_counter() - t0}  # fmt: skip
    (out / QWEN_CACHE_FILE).write_text(json.dumps(meta))
    return out


def main(argv: list[str] | None = None, prog: str = "python -m train.precompute") -> int:
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="jaxedit model folder (text encoders + VAE)")
    p.add_argument("--data", required=True, help="dataset folder with manifest.jsonl (or the manifest)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--pixel-budget", type=int, default=DataConfig.pixel_budget, help="max bucket area in pixels")
    p.add_argument("--bucket-step", type=int, default=DataConfig.bucket_step, help="bucket widths: multiples of this")
    p.add_argument("--batch", type=int, default=64, help="items encoded at once (Step1X-Edit: try 8)")
    p.add_argument("--mesh", default="", help="Step1X-Edit: mesh of the Qwen2.5-VL (default: every device on fsdp)")
    args = p.parse_args(argv)
    data = DataConfig(path=args.data, pixel_budget=args.pixel_budget, bucket_step=args.bucket_step)
    try:
        from jaxedit.pipelines.batch import check_output_dir

        check_output_dir(Path(args.out))
        out = precompute(args.model, data, args.out, args.batch, args.mesh)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads(((out / CACHE_FILE) if (out / CACHE_FILE).is_file() else (out / QWEN_CACHE_FILE)).read_text())
    print(f"cached {len(meta['ids'])} items in {out} ({meta['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
