"""Cache text embeddings and VAE latents of a dataset, so training never runs the encoders.

    python -m train.precompute --model FOLDER --data DATA --out CACHE [--pixel-budget N --bucket-step S]

Then train with `--set data.cache=CACHE` (the same data.path, pixel_budget and bucket_step:
the cache is keyed by the indexed items and checked against them). CACHE holds
  cache.json                  model folder, manifest, item ids (index order), buckets
  txt.npy [N, Lt, D] y.npy [N, Dy]        text embeddings of each item's instruction
  empty_txt.npy empty_y.npy               the empty prompt's (prompt dropout)
  reference_WxH.npy target_WxH.npy        VAE latents (posterior mean) per bucket [n_b, H/8, W/8, C]
  rows.npy [N]                            each item's row in its bucket's arrays
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from jaxedit import model_folder
from jaxedit.checkpoint import load_params
from jaxedit.train.data import DataConfig, Index, index_manifest, load_image

CACHE_FILE = "cache.json"


def precompute(model: str | Path, data: DataConfig, out: str | Path, batch: int = 64) -> Path:
    from jaxedit.train.loop import Encoder

    folder, out = Path(model), Path(out)
    preset = model_folder.read_description(folder)
    model_folder.check_complete(folder, preset)
    parts = {p: load_params(folder / p) for p in ("vae", "t5", "clip")}
    encoder = Encoder(folder, preset, parts, vae_sample=False)
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
    for b, (w, h) in enumerate(index.buckets):
        members = [k for k, it in enumerate(index.items) if it.bucket == b]
        if not members:
            continue
        lat = {"reference": [], "target": []}
        for i in range(0, len(members), batch):
            chunk = [index.items[k] for k in members[i : i + batch]]
            for name, attr in (("reference", "source"), ("target", "target")):
                x = np.stack([load_image(getattr(it, attr), (w, h)) for it in chunk])
                lat[name].append(np.asarray(encoder._encode(encoder.vae_params, x, None), np.float32))
        for name, arrays in lat.items():
            np.save(out / f"{name}_{w}x{h}.npy", np.concatenate(arrays))
        rows[members] = np.arange(len(members))
    np.save(out / "rows.npy", rows)
    meta = {
        "model": str(folder.absolute()),
        "manifest": str(Path(data.path).absolute()),
        "ids": [it.id for it in index.items],
        "buckets": [list(b) for b in index.buckets],
        "item_buckets": [it.bucket for it in index.items],
        "seconds": time.perf_counter() - t0,
    }
    (out / CACHE_FILE).write_text(json.dumps(meta))
    return out


class Cache:
    """Memory-mapped cache arrays, checked against the current index."""

    def __init__(self, path: str | Path, index: Index):
        self.path = Path(path)
        meta_path = self.path / CACHE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"data.cache {self.path}: no {CACHE_FILE} (run python -m train.precompute)")
        meta = json.loads(meta_path.read_text())
        ids = [it.id for it in index.items]
        if meta["ids"] != ids or meta["buckets"] != [list(b) for b in index.buckets]:
            raise ValueError(
                f"data.cache {self.path} was computed for other items or buckets than data.path now indexes "
                f"({len(meta['ids'])} cached vs {len(ids)} items): recompute it"
            )
        load = lambda name: np.load(self.path / name, mmap_mode="r")  # noqa: E731
        self.txt, self.y, self.rows = load("txt.npy"), load("y.npy"), load("rows.npy")
        self.empty = (np.asarray(load("empty_txt.npy")), np.asarray(load("empty_y.npy")))
        self.latents = {}
        for b, (w, h) in enumerate(index.buckets):
            if (self.path / f"target_{w}x{h}.npy").is_file():
                self.latents[b] = (load(f"reference_{w}x{h}.npy"), load(f"target_{w}x{h}.npy"))

    def item(self, k: int, bucket: int) -> dict[str, np.ndarray]:
        ref, tgt = self.latents[bucket]
        r = int(self.rows[k])
        return {"reference": ref[r], "target": tgt[r], "txt": self.txt[k], "y": self.y[k]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="jaxedit model folder (text encoders + VAE)")
    p.add_argument("--data", required=True, help="dataset folder with manifest.jsonl (or the manifest)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--pixel-budget", type=int, default=DataConfig.pixel_budget)
    p.add_argument("--bucket-step", type=int, default=DataConfig.bucket_step)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    data = DataConfig(path=args.data, pixel_budget=args.pixel_budget, bucket_step=args.bucket_step)
    out = precompute(args.model, data, args.out, args.batch)
    meta = json.loads((out / CACHE_FILE).read_text())
    print(f"cached {len(meta['ids'])} items in {out} ({meta['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
