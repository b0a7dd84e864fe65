"""Training batches from a packed dataset (`jaxedit data pack`): the folder reader's grain pipeline
(`jaxedit.train.data.EditBatches`: epochs planned from (seed, epoch), global batches of one group, process p of P
taking items [p*B/P, (p+1)*B/P) of each, the iterator's state = the next batch index) over ArrayRecord shards read
at random (grain's `ArrayRecordDataSource`).

The plan needs each example's group only: it comes from DATASET/sizes.npy (no record read), bucketed under the
run's DataConfig (its settings need not be the pack's). Examples keep their input order, so a packed folder
dataset gives the same batches as the folder itself for the same seed, with one difference: the pack decodes
every image and drops those that do not decode (bad rows), where the folder reader plans with them and replaces
each, when it fails to decode, by the next good item of its group; with every image decodable the batches are
identical. Remote shards are read from local copies (`jaxedit.data.paths.local_copy`, sha256 checked on the
way); local ones are checked against the index's byte sizes before the first step (their sha256 too with
`data.verify`): a mismatch stops the run with one line naming the shard. With data.cache (the dataset's encoder
cache as record shards, `jaxedit.data.cache`), a batch holds the cached arrays of the same examples instead.
"""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from jaxedit.data import cache, paths, records
from jaxedit.train.data import DataConfig, EditBatches, Index, Item, load_image, make_buckets, nearest_bucket


@dataclasses.dataclass(frozen=True)
class RecordItem:
    """A planned example: its record number and groups (its id and instruction are read with its images)."""

    record: int
    bucket: int  # the target's bucket
    source_buckets: tuple[int, ...]

    @property
    def group(self) -> tuple[int, tuple[int, ...]]:
        return (self.bucket, self.source_buckets)

    @property
    def id(self) -> str:
        return f"record {self.record}"


shard_paths = records.shard_paths  # (where it was first defined)


class RecordItems(Sequence):
    """The planned examples as arrays (no object per example): item k is record `record[k]` (k itself if None), of
    group `groups[group_of[k]]`; a RecordItem made on demand."""

    def __init__(self, record: np.ndarray | None, group_of: np.ndarray, groups: list[tuple[int, tuple[int, ...]]]):
        self.record, self.group_of, self.groups = record, group_of, groups

    def __len__(self) -> int:
        return len(self.group_of)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = range(len(self))[k]  # (an IndexError past the end, negative k from the end)
        bucket, sources = self.groups[self.group_of[k]]
        return RecordItem(k if self.record is None else int(self.record[k]), bucket, sources)


def bucket_of(buckets: list[tuple[int, int]], wh: np.ndarray) -> np.ndarray:
    """`nearest_bucket` of each (width, height) of wh [..., 2] (int32; computed once per distinct aspect ratio)."""
    ratio = wh[..., 0] / wh[..., 1]  # (what nearest_bucket's log is of: the same float)
    distinct, inverse = np.unique(ratio, return_inverse=True)
    pick = np.array([nearest_bucket(buckets, r, 1.0) for r in distinct.tolist()], np.int32)
    return pick[inverse.reshape(ratio.shape)]


def index_records(cfg: DataConfig, max_sources: int | None = None) -> Index:
    """The planned examples of the packed dataset at cfg.path, bucketed under cfg's settings: arrays (each example's
    record and group number: 4 bytes each), no object per example."""
    sizes = np.asarray(records.read_sizes(cfg.path))  # [n, 1 + sources, 2]: (width, height); a missing source 0, 0
    buckets = make_buckets(cfg.pixel_budget, cfg.bucket_step, cfg.max_aspect)
    skipped, record = Counter(), None
    present = sizes[:, 1:, 0] > 0
    if max_sources is not None:
        keep = present.sum(1) <= max_sources
        if (~keep).any():
            skipped["too many sources"] += int((~keep).sum())
            record = np.flatnonzero(keep).astype(np.int32 if len(sizes) < 2**31 else np.int64)
            sizes, present = sizes[keep], present[keep]
    # each example's row (target bucket, source buckets, present sources first in order, -1 after) as one int64,
    # in base len(buckets) + 1 (digits bucket + 1): its order is the rows' (and their groups') order
    base, width = len(buckets) + 1, sizes.shape[1]
    if base**width >= 2**62:
        raise ValueError(f"{width - 1} sources of {len(buckets)} buckets: too many to plan")
    key = np.empty(len(sizes), np.int64)
    for a in range(0, len(sizes), 1 << 16):  # (in chunks: a few MB of temporaries at most)
        wh, have = sizes[a : a + (1 << 16)], present[a : a + (1 << 16)]
        srcs = np.where(have, bucket_of(buckets, np.maximum(wh[:, 1:], 1)), -1)
        srcs = np.take_along_axis(srcs, np.argsort(~have, axis=1, kind="stable"), 1)
        k = bucket_of(buckets, np.maximum(wh[:, 0], 1)).astype(np.int64) + 1
        for j in range(srcs.shape[1]):
            k = k * base + (srcs[:, j] + 1)
        key[a : a + len(k)] = k
    del sizes, present
    distinct, group_of = np.unique(key, return_inverse=True)
    del key
    groups = []
    for v in distinct.tolist():
        digits = []
        for _ in range(width):
            v, d = divmod(v, base)
            digits.append(d - 1)
        bucket, *sources = digits[::-1]
        groups.append((bucket, tuple(b for b in sources if b >= 0)))
    assert groups == sorted(groups)  # (numbered in their sorted order, as the planning requires)
    group_of = group_of.reshape(-1).astype(np.int32)
    return Index(RecordItems(record, group_of, groups), buckets, skipped, groups=groups, group_of=group_of)


class ShardBatches(EditBatches):
    """Global batch index -> this process's part of that batch, read from the shards."""

    def __init__(
        self,
        cfg: DataConfig,
        index: Index,
        shards: list[str],
        process_index: int,
        process_count: int,
        model: Any = None,
        dataset_index: dict | None = None,
    ):
        """With data.cache (`jaxedit.data.cache`, checked against the dataset's index and, given, the run's model
        folder), batches are the cached arrays of the examples instead of their images."""
        super().__init__(dataclasses.replace(cfg, cache=""), index, process_index, process_count)
        self.cfg = cfg
        self.source = grain.sources.ArrayRecordDataSource(shards)
        if cfg.cache:
            dataset_index = dataset_index or records.read_index(cfg.path)
            self.cache = cache.RecordCache(cfg.cache, cfg, dataset_index, model)

    def __call__(self, i: int) -> dict[str, Any]:
        if self.cache is None:
            return super().__call__(i)
        got = [self.cache.record(self.index.items[k].record) for k in self.batch(i)]
        out = {name: np.stack([a[name] for _, a in got]) for name in got[0][1]}
        return out | {"instruction": [h["instruction"] for h, _ in got], "id": [h["id"] for h, _ in got], "n_bad": 0}

    def decode(self, item: RecordItem) -> tuple[records.Example, dict[str, np.ndarray]]:
        ex = records.decode(self.source[item.record])
        if len(ex.sources) != len(item.source_buckets):
            raise ValueError(f"record {item.record} holds {len(ex.sources)} sources, sizes.npy says otherwise")
        sizes = self.index.buckets
        decoded = {"source" if i == 0 else f"source_{i}": load_image(io.BytesIO(b), sizes[k])
                   for i, (b, k) in enumerate(zip(ex.sources, item.source_buckets))}  # fmt: skip
        return ex, decoded | {"target": load_image(io.BytesIO(ex.target), sizes[item.bucket])}

    def sample_items(self, n: int, out_dir: Path) -> list[Item]:
        """The first `n` examples, their images written as files in `out_dir` (sample edits read files)."""
        out = []
        for it in self.index.items[:n]:
            ex = records.decode(self.source[it.record])
            files = []
            for j, data in enumerate([*ex.sources, ex.target]):
                files.append(Path(out_dir) / f"{it.record}_{j}.img")
                paths.write_bytes(str(files[-1]), data)
            more = tuple(zip(files[:-1], it.source_buckets)) if len(ex.sources) > 1 else ()
            out.append(Item(ex.id, files[0], files[-1], ex.instruction, it.bucket, more))
        return out


def make_iterator(
    cfg: DataConfig,
    epochs: int = 10_000,
    model: Any = None,
    max_sources: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[grain.DatasetIterator, ShardBatches]:
    """`jaxedit.train.data.make_iterator` over the packed dataset at cfg.path (model: the run's model folder, checked
    against data.cache)."""
    index_json = records.read_index(cfg.path)
    shards = shard_paths(cfg.path, index_json, cfg.copies, cfg.verify)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    batches = ShardBatches(cfg, index_records(cfg, max_sources), shards, pi, pc, model, index_json)
    ds = grain.MapDataset.range(batches.per_epoch * epochs).map(batches)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
    return iter(it), batches
