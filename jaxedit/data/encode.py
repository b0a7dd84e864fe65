"""Write the encoder cache of a packed dataset as record shards (`jaxedit.data.cache`), each jax process encoding
its own share.

The family's precompute hook decides what is cached: it gives `write` an `encode(host_batch) -> {name: [b, ...]}`
over host batches as the training reader makes them (decoded images "source", "source_1", ..., "target"
[b, H, W, 3] at their buckets under the run's DataConfig, and "instruction"), the empty prompt's arrays and the
identity of what computed them (model folder, digest of its parts). This module plans the shards, decodes the
examples, batches them by group (padded to `batch`: one compiled shape per group), writes the records in the
dataset's order and, last, the index.

The cache's records are cut into shards of `shard_size` records independently of the number of processes; process
p of P writes shards [p*S/P, (p+1)*S/P). A shard is written beside its final name and renamed in (uploaded whole
on object storage), then its progress record: run again after an interruption, a process skips the shards whose
progress record exists. When every process is done (a barrier under `jax.distributed`), process 0 writes the index.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from jaxedit.data import cache, paths, reader, records

log = logging.getLogger(__name__)
TASKS = "progress/tasks.json"


def plan(examples: int, shard_size: int) -> list[list[int]]:
    """[start, stop) record ranges of the cache's shards."""
    return [[a, min(a + shard_size, examples)] for a in range(0, examples, shard_size)]


def share(shards: int, process_index: int, process_count: int) -> range:
    """The shards process p of P writes."""
    return range(process_index * shards // process_count, (process_index + 1) * shards // process_count)


def write_shard(out: str, k: int, span: list[int], batches: reader.ShardBatches, encode: Callable, batch: int) -> dict:
    """Cache shard k: records span[0]..span[1]-1 of the dataset, encoded by group in padded batches."""
    t0 = time.perf_counter()
    items = batches.index.items[span[0] : span[1]]
    by_group: dict[Any, list] = {}
    for it in items:
        by_group.setdefault(it.group, []).append(it)
    done: dict[int, bytes] = {}
    for group in sorted(by_group):
        members = by_group[group]
        for i in range(0, len(members), batch):
            chunk = members[i : i + batch]
            decoded = [batches.decode(it) for it in chunk]
            pad = decoded + [decoded[-1]] * (batch - len(chunk))  # (padded: one shape per group)
            host = {name: np.stack([d[name] for _, d in pad]) for name in decoded[0][1]}
            arrays = encode(host | {"instruction": [ex.instruction for ex, _ in pad]})
            for j, (it, (ex, _)) in enumerate(zip(chunk, decoded)):
                arrays_j = {name: np.asarray(a[j]) for name, a in arrays.items()}
                done[it.record] = cache.encode_arrays({"id": ex.id, "instruction": ex.instruction}, arrays_j)
    name = f"shards/{k:05d}.array_record"
    with paths.written_at(paths.join(out, name)) as tmp:
        writer = ArrayRecordWriter(str(tmp), records.WRITER_OPTIONS)
        try:
            for r in range(*span):
                writer.write(done[r])
        finally:
            writer.close()
        digest, size = paths.sha256_of(str(tmp))
    progress = {"shard": name, "span": span, "records": span[1] - span[0], "bytes": size, "sha256": digest,
                "seconds": time.perf_counter() - t0}  # fmt: skip
    paths.write_bytes(paths.join(out, f"progress/{k:05d}.json"), json.dumps(progress))
    return progress


def write(
    out: str,
    data: Any,
    encode: Callable[[dict], dict[str, np.ndarray]],
    empty: dict[str, np.ndarray],
    identity: dict,
    batch: int = 8,
    shard_size: int = 256,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict | None:
    """Cache the packed dataset at data.path into `out`: this process's share of the shards, then (process 0, once
    every share is there) the index, returned (None: a share is still missing). `identity`: {"model": ...,
    "parts": {part: digest}} (checked in training against the run's model folder)."""
    import jax

    t0 = time.perf_counter()
    multi = process_index is None and jax.process_count() > 1
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    dataset_index = records.read_index(data.path)
    cfg = dataclasses.replace(data, batch_size=1, cache="")
    shards = records.shard_paths(data.path, dataset_index, data.copies, data.verify)
    batches = reader.ShardBatches(cfg, reader.index_records(cfg), shards, 0, 1)
    if len(batches.index.items) != dataset_index["examples"]:
        raise ValueError(f"{data.path}: sizes.npy lists {len(batches.index.items)} examples, the index "
                         f"{dataset_index['examples']}")  # fmt: skip
    spans = plan(dataset_index["examples"], shard_size)
    tasks = {"spans": spans, "dataset_shards": [s["sha256"] for s in dataset_index["shards"]],
             "settings": cache.settings_of(data), "identity": identity}  # fmt: skip
    url = paths.join(out, TASKS)
    if pi == 0:
        begun = json.loads(paths.read_bytes(url)) if paths.exists(url) else None
        if begun is not None and begun != tasks:
            raise ValueError(f"{out} holds an unfinished cache of another dataset, model or settings: remove it "
                             "or write elsewhere")  # fmt: skip
        paths.write_bytes(url, json.dumps(tasks))
    if pi == 0 and not paths.exists(paths.join(out, cache.EMPTY)):
        paths.write_bytes(paths.join(out, cache.EMPTY), cache.encode_arrays({"id": "", "instruction": ""}, empty))
    for k in share(len(spans), pi, pc):
        if not paths.exists(paths.join(out, f"progress/{k:05d}.json")):
            write_shard(out, k, spans[k], batches, encode, batch)
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxedit precompute: every share written")
    if pi != 0:
        return None
    return finish(out, tasks, dataset_index, data.path, time.perf_counter() - t0)


def finish(out: str, tasks: dict, dataset_index: dict, dataset: str, seconds: float) -> dict | None:
    """The cache's index from the shards' progress records (None if one is missing: another share is running)."""
    progress = []
    for k in range(len(tasks["spans"])):
        u = paths.join(out, f"progress/{k:05d}.json")
        if not paths.exists(u):
            log.warning("%s: shard %d not written yet (another process's share): no index written", out, k)
            return None
        progress.append(json.loads(paths.read_bytes(u)))
    first = cache.decode_arrays(paths.read_bytes(paths.join(out, cache.EMPTY)))[1]
    index = {
        "format": cache.FORMAT,
        "version": cache.VERSION,
        "dataset": dataset,
        "dataset_shards": tasks["dataset_shards"],
        "examples": dataset_index["examples"],
        "settings": tasks["settings"],
        "identity": tasks["identity"],
        "empty": {k: [v.dtype.str, list(v.shape)] for k, v in first.items()},
        "seconds": seconds,
        "shards": [
            {"path": p["shard"], "records": p["records"], "bytes": p["bytes"], "sha256": p["sha256"]} for p in progress
        ],
    }
    paths.write_bytes(paths.join(out, records.INDEX), json.dumps(index, indent=1))
    return index
