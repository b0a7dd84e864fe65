"""FLUX.1 Kontext's training cache: T5 + CLIP embeddings and VAE latents of every item of a dataset (a
`data.cache`, laid out as `jaxedit.train.precompute` describes)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxedit import model_folder
from jaxedit.checkpoint import load_params
from jaxedit.data import encode, records
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


def precompute_text(folder: Path, preset, data: DataConfig, out: Path | str, batch: int = 64, shard_size: int = 256):
    """FLUX.1 Kontext: T5 + CLIP embeddings and VAE latents of every item (a data.cache); of a packed dataset, as
    record shards (`precompute_records`)."""
    model_folder.check_complete(folder, preset)
    parts = {p: load_params(folder / p) for p in ("vae", "t5", "clip")}
    encoder = KontextEncoder(folder, preset, parts, vae_sample=False)
    if records.is_packed(data.path):
        return precompute_records(folder, encoder, data, str(out), batch, shard_size)
    out = Path(out)
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
    return meta


def precompute_records(folder: Path, encoder: Any, data: DataConfig, out: str, batch: int, shard_size: int) -> dict:
    """The cache of a packed dataset as record shards (`jaxedit.data.encode`): each example's VAE latents
    ("target", "reference", "reference_1", ...) and T5 + CLIP embeddings ("txt", "y"), as the inline encoder gives
    them to the train step; the empty prompt's ("txt", "y") once. This process encodes its share."""
    import jax

    key = jax.random.key(0)  # (unused: posterior means)
    etxt, ey = encoder.text.encode([""])
    empty = {"txt": np.asarray(etxt[0], np.float32), "y": np.asarray(ey[0], np.float32)}
    identity = {"model": str(folder.absolute()), "parts": model_folder.digest(folder, CACHED_PARTS)}
    t0 = time.perf_counter()
    index = encode.write(out, data, lambda host: encoder(host, key), empty, identity, batch, shard_size)
    n = records.read_index(data.path)["examples"]
    return {"ids": range(n), "seconds": time.perf_counter() - t0, "index": index}
