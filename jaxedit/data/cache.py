"""The encoder cache of a packed dataset as record shards (written by `jaxedit.data.encode`, read in training).

    CACHE/index.json                   written last: format, the dataset it was computed from (its URL, its shards'
                                       sha256, example count), the bucket settings, what computed it (the model
                                       folder's digest of the parts the family names), the arrays, the shards
    CACHE/empty.record                 the empty prompt's arrays (prompt dropout), once
    CACHE/shards/NNNNN.array_record    one record per dataset example, in the dataset's record order: record r of
                                       the cache is record r of the dataset
    CACHE/progress/NNNNN.json          the writer's record of each finished shard (a rerun skips them)

A record: b"JXA1", a 4-byte little-endian header length, the header (UTF-8 JSON: the example's id and instruction,
each array's name, dtype and shape, in order), then each array's bytes (C order). Which arrays a record holds is
the model family's choice (its precompute hook); this module only stores and checks them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from jaxedit.data import paths, records

FORMAT = "jaxedit-cache"
VERSION = 1
MAGIC = b"JXA1"
EMPTY = "empty.record"


def encode_arrays(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """A record of `header` (JSON: id, instruction) and the named arrays."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    h = dict(header) | {"arrays": [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]}
    return records.frame(MAGIC, h, [v.tobytes() for v in arrays.values()])


def decode_arrays(record: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, {name: array}) of a record (arrays read-only views of its bytes); ValueError if it is not one."""
    h, at = records.unframe(record, MAGIC, "jaxedit cache record")
    out = {}
    for name, dtype, shape in h["arrays"]:
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if at + size > len(record):
            raise ValueError(f"cache record truncated (array {name})")
        out[name] = np.frombuffer(record, dt, size // dt.itemsize, at).reshape(shape)
        at += size
    if at != len(record):
        raise ValueError(f"cache record holds {len(record) - at} bytes more than its header says")
    return h, out


def settings_of(data: Any) -> dict:
    """The bucket settings of a DataConfig the cached latents depend on."""
    return {"pixel_budget": data.pixel_budget, "bucket_step": data.bucket_step, "max_aspect": data.max_aspect}


def read_index(url: str) -> dict:
    """A cache's index; FileNotFoundError / ValueError naming the cache if it is not a complete one."""
    at = paths.join(url, records.INDEX)
    try:
        index = json.loads(paths.read_bytes(at))
    except FileNotFoundError:
        raise FileNotFoundError(f"data.cache {url}: no {records.INDEX} (run jaxedit precompute, or it did not "
                                "finish)") from None  # fmt: skip
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"data.cache {url}: not a {FORMAT} v{VERSION} index (a cache of a manifest folder?)")
    return index


def check(url: str, data: Any, dataset_index: dict, model: Any = None) -> dict:
    """The cache's index, checked against the packed dataset's index (its shards' sha256 and example count), the
    run's bucket settings and, given the run's model folder, the digests of the parts that computed it: ValueError
    in one line naming what differs."""
    index = read_index(url)
    shas = [s["sha256"] for s in dataset_index["shards"]]
    if index["dataset_shards"] != shas or index["examples"] != dataset_index["examples"]:
        n, m = index["examples"], dataset_index["examples"]
        raise ValueError(f"data.cache {url} was computed from other shards than data.path {data.path} holds "
                         f"({n} cached vs {m} examples): recompute it")  # fmt: skip
    if index["settings"] != settings_of(data):
        raise ValueError(f"data.cache {url} was computed with bucket settings {index['settings']}, the run has "
                         f"{settings_of(data)}: recompute it or use its settings")  # fmt: skip
    if model is not None:
        from jaxedit import model_folder

        was = index["identity"]["parts"]
        now = model_folder.digest(model, tuple(was))
        changed = [p for p in was if was[p] != now[p]]
        if changed:
            raise ValueError(f"data.cache {url} was computed with other {', '.join(changed)} than model folder "
                             f"{model} holds now (cached from {index['identity']['model']}): recompute it with "
                             "jaxedit precompute")  # fmt: skip
    return index


class RecordCache:
    """The cached arrays of a packed dataset's examples, by record number (checked: `check`)."""

    def __init__(self, url: str, data: Any, dataset_index: dict, model: Any = None):
        import grain

        self.url = url
        self.index = check(url, data, dataset_index, model)
        self.source = grain.sources.ArrayRecordDataSource(records.shard_paths(url, self.index, data.copies,
                                                                              data.verify))  # fmt: skip
        _, empty = decode_arrays(paths.read_bytes(paths.join(url, EMPTY)))
        self.empty = tuple(empty.values())  # (the family's order: Kontext's (txt, y))
        self.empty_arrays = empty

    def record(self, r: int) -> tuple[dict, dict[str, np.ndarray]]:
        """(header: id, instruction; {name: array}) of dataset record r."""
        return decode_arrays(self.source[r])
