"""Step1X-Edit's training cache: each item's Qwen2.5-VL output of (instruction, source image at its bucket size)
and of ("", source image), one .npz per (prompt, image) as training's per-item cache names them (train with
`--set qwen_cache=CACHE`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from jaxedit.train.data import DataConfig, index_manifest, load_image

QWEN_CACHE_FILE = "qwen_cache.json"  # a Step1X-Edit cache's summary (not a data.cache: training reads the .npz)


def precompute_qwen(folder: Path, data: DataConfig, out: Path, batch: int = 8, mesh: str = "") -> dict:
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
    return meta
