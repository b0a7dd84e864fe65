"""`jaxedit data pack`: input rows (`jaxedit.data.sources`) -> validated examples -> ArrayRecord shards + index.

Each task of the source (a block of manifest lines, a Parquet file, a tar file) becomes one shard, written by a
pool of threads (image checks decode with Pillow, which releases the GIL); shard k holds task k's good rows in
input order, so the dataset's examples are in input order. A shard is written beside its final name and renamed
in (uploaded whole on object storage), then its progress record (DATASET/progress/NNNNN.json: counts, checksum,
sizes, bad rows) is written: a pack killed at any point and run again skips the tasks whose record exists and
redoes the others. The index is written last, from the progress records.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from jaxedit.data import paths
from jaxedit.data.records import (
    BAD_ROWS,
    FORMAT,
    INDEX,
    SIZES,
    VERSION,
    WRITER_OPTIONS,
    BadRow,
    BucketSettings,
    check,
    count_groups,
    encode,
)

log = logging.getLogger(__name__)
TASKS = "progress/tasks.json"


def shard_name(k: int) -> str:
    return f"shards/{k:05d}.array_record"


def progress_name(k: int) -> str:
    return f"progress/{k:05d}.json"


@dataclasses.dataclass(frozen=True)
class Summary:
    rows: int
    examples: int
    bad_rows: dict[str, int]
    shards: int
    bytes: int
    seconds: float
    resumed: int  # shards a previous, interrupted pack had finished

    def __str__(self) -> str:
        bad = sum(self.bad_rows.values())
        resumed = f" ({self.resumed} shards resumed from an earlier run)" if self.resumed else ""
        return (f"{self.rows} rows: {self.examples} examples, {bad} bad {self.bad_rows}; {self.shards} shards, "
                f"{self.bytes / 1e6:.1f} MB in {self.seconds:.1f}s{resumed}")  # fmt: skip


def pack_task(source: Any, task: Any, k: int, out: str, settings: BucketSettings) -> dict:
    """Write shard k from `task`'s rows; returns (and records) its progress record."""
    t0 = time.perf_counter()
    buckets = settings.buckets()
    bad, sizes, groups, rows, records = [], [], [], 0, 0
    with paths.written_at(paths.join(out, shard_name(k))) as tmp:
        writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
        try:
            for where, row in source.rows(task):
                rows += 1
                try:
                    if isinstance(row, BadRow):
                        raise row
                    ex = check(row["id"], row["instruction"], row["sources"], row["target"], buckets)
                except BadRow as e:
                    bad.append({"where": where, "reason": e.reason, "detail": e.detail})
                    continue
                writer.write(encode(ex))
                records += 1
                sizes.append([list(ex.sizes[-1])] + [list(s) for s in ex.sizes[:-1]])
                groups.append(ex.bucket)
        finally:
            writer.close()
        digest, size = paths.sha256_of(str(tmp))
    record = {"task": task, "shard": shard_name(k), "rows": rows, "records": records, "bytes": size,
              "sha256": digest, "sizes": sizes, "groups": [[g, list(s)] for g, s in groups], "bad": bad,
              "seconds": time.perf_counter() - t0}  # fmt: skip
    paths.write_bytes(paths.join(out, progress_name(k)), json.dumps(record))
    return record


def pack(
    source: Any, out: str, settings: BucketSettings | None = None, workers: int = 4, describe: str = ""
) -> Summary:
    """Pack `source`'s rows into the dataset at `out` (resuming an interrupted pack of the same input)."""
    t0 = time.perf_counter()
    settings = settings or BucketSettings()
    tasks = source.tasks()
    url = paths.join(out, TASKS)
    begun = json.loads(paths.read_bytes(url)) if paths.exists(url) else None
    if begun is not None and begun != {"tasks": tasks, "settings": dataclasses.asdict(settings)}:
        raise ValueError(f"{out} holds an unfinished pack of other input or settings: remove {out} or pack elsewhere")
    paths.write_bytes(url, json.dumps({"tasks": tasks, "settings": dataclasses.asdict(settings)}))
    done = {}
    for k in range(len(tasks)):
        u = paths.join(out, progress_name(k))
        if paths.exists(u):
            done[k] = json.loads(paths.read_bytes(u))
    resumed = len(done)
    todo = [k for k in range(len(tasks)) if k not in done]
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        futures = {k: pool.submit(pack_task, source, tasks[k], k, out, settings) for k in todo}
        for k, f in futures.items():
            done[k] = f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    describe = describe or type(source).__name__
    summary = finish(out, [done[k] for k in range(len(tasks))], settings, describe, time.perf_counter() - t0)
    return dataclasses.replace(summary, resumed=resumed)


def finish(out: str, records: list[dict], settings: BucketSettings, describe: str, seconds: float) -> Summary:
    """bad_rows.jsonl, sizes.npy and, last, index.json from the shards' progress records."""
    buckets = settings.buckets()
    bad = [b for r in records for b in r["bad"]]
    paths.write_bytes(paths.join(out, BAD_ROWS), "".join(json.dumps(b) + "\n" for b in bad))
    sizes = [s for r in records for s in r["sizes"]]
    width = max((len(s) for s in sizes), default=2)
    arr = np.zeros((len(sizes), width, 2), np.int32)
    for i, s in enumerate(sizes):
        arr[i, : len(s)] = s
    buf = io.BytesIO()
    np.save(buf, arr)
    paths.write_bytes(paths.join(out, SIZES), buf.getvalue())
    groups = [(g, tuple(s)) for r in records for g, s in r["groups"]]
    shards = [{"path": r["shard"], "records": r["records"], "bytes": r["bytes"], "sha256": r["sha256"]}
              for r in records if r["records"]]  # fmt: skip
    reasons = dict(Counter(b["reason"] for b in bad))
    index = {
        "format": FORMAT,
        "version": VERSION,
        "input": describe,
        "rows": sum(r["rows"] for r in records),
        "examples": len(sizes),
        "max_sources": width - 1,
        "bad_rows": reasons,
        "settings": dataclasses.asdict(settings),
        "buckets": [list(b) for b in buckets],
        "groups": count_groups(groups, buckets),
        "seconds": sum(r["seconds"] for r in records),
        "shards": shards,
    }
    paths.write_bytes(paths.join(out, INDEX), json.dumps(index, indent=1))
    if bad:
        log.warning("skipped %d bad row(s) %s (listed in %s)", len(bad), reasons, paths.join(out, BAD_ROWS))
    return Summary(index["rows"], len(sizes), reasons, len(shards), sum(s["bytes"] for s in shards), seconds, 0)
