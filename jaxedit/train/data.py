"""Training data: a grain pipeline over a folder with a JSONL manifest of edit pairs.

    DATA/manifest.jsonl   one JSON object a line:
        {"source": "a/0.png", "target": "b/0.png", "instruction": "make it red", "id": "0"}
    (paths relative to the manifest's folder; `id` optional, defaults to the line number)
        {"sources": ["person.png", "scene.png"], "target": ..., "instruction": ...}
    several reference images (one listed: as "source"), in order; the loss stays on the target

Pipeline: the manifest is indexed once (image headers only: sizes, no decoding); each
pair goes to the aspect-ratio bucket nearest in log-aspect (bucket sides multiples of 16,
area <= pixel_budget). An item of several sources has each source in its own bucket (nearest to
its aspect; they need not match the target's size) and is batched with the items of the same
target bucket and source buckets (its `group`). Every epoch is planned from (seed, epoch): items
shuffled within their group, cut into global batches of one group, batch order shuffled. A grain
`MapDataset` maps global batch index -> this process's slice of that batch (process p of
P takes items [p*B/P, (p+1)*B/P)), decoded with Pillow (resize to cover, centre crop,
LANCZOS, [-1, 1]). The iterator's state (next batch index) is what a checkpoint stores.

Bad samples never crash the run: at indexing, a line that is not UTF-8 or not JSON, a
missing/unreadable image, source and target of different sizes (one source), an empty instruction or
one that is not a string, more sources than the model takes skips the item (counted per reason in
`index.skipped`, named by its line in `index.skipped_lines`); an image that fails to DECODE later is
replaced by the next good item of the same group (counted in each batch's `n_bad`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import grain
import jax
import numpy as np
from PIL import Image

from jaxedit import jsonl
from jaxedit.image_files import displayed_size, orientation, upright

log = logging.getLogger(__name__)

CACHE_FILE = "cache.json"  # the description of a `python -m train.precompute` cache
CACHED_PARTS = ("vae", "t5", "clip", "tokenizer", "tokenizer_2")  # what its arrays were computed with


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""  # dataset folder holding `manifest`, or the manifest file itself
    manifest: str = "manifest.jsonl"
    batch_size: int = 8  # global batch (all processes, all micro-batches of one step)
    pixel_budget: int = 512 * 512  # max bucket area in pixels
    bucket_step: int = 64  # bucket widths are multiples of this (a multiple of 16)
    max_aspect: float = 3.0
    seed: int = 0
    num_threads: int = 2  # decoding threads per process
    prefetch: int = 2  # batches prefetched
    cache: str = ""  # folder written by `python -m train.precompute`: latents + text embeddings, no decoding
    # a packed dataset (`jaxedit data pack`; `path` holds its index.json) on a remote filesystem: where its shards
    # are copied (default $JAXEDIT_DATA_COPIES, else TMPDIR/jaxedit-shards)
    copies: str = ""
    verify: bool = False  # a packed dataset: sha256 of every local shard before the first step (remote: always)


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    source: Path  # the first (or only) source
    target: Path
    instruction: str
    bucket: int  # the target's bucket (and a single source's)
    sources: tuple[tuple[Path, int], ...] = ()  # several sources: (path, bucket) of each, in order

    def source_list(self) -> list[tuple[Path, int]]:
        """(path, bucket) of every source, in order."""
        return list(self.sources) or [(self.source, self.bucket)]

    @property
    def group(self) -> tuple[int, tuple[int, ...]]:
        """What the items of a batch share: the target's bucket and each source's."""
        return (self.bucket, tuple(b for _, b in self.source_list()))


def reference_key(i: int) -> str:
    """The batch key of source i's latents: "reference", "reference_1", ..."""
    return "reference" if i == 0 else f"reference_{i}"


def group_name(buckets: list[tuple[int, int]], group: tuple[int, tuple[int, ...]]) -> str:
    """A group's name in cache file names: "WxH" (the target's bucket, one source in it), else
    "WxH_from_W1xH1+W2xH2..." (the sources' buckets)."""
    size = lambda b: "{}x{}".format(*buckets[b])  # noqa: E731
    bucket, sources = group
    return size(bucket) if sources == (bucket,) else f"{size(bucket)}_from_" + "+".join(map(size, sources))


@dataclasses.dataclass
class Index:
    items: Sequence  # Items (the folder reader), or a sequence that makes each on demand (the shard reader)
    buckets: list[tuple[int, int]]  # (width, height)
    skipped: Counter
    skipped_lines: list[str] = dataclasses.field(default_factory=list)  # "MANIFEST:LINE: reason" of each
    # the items' groups, sorted, and each item's group in that list (int32 [n]); computed from `items` if not given
    groups: list[tuple[int, tuple[int, ...]]] | None = None
    group_of: np.ndarray | None = None

    def grouping(self) -> tuple[list[tuple[int, tuple[int, ...]]], np.ndarray]:
        """(the sorted groups, each item's group number): what epochs are planned from."""
        if self.group_of is None:
            keys = [it.group for it in self.items]
            self.groups = sorted(set(keys))
            number = {g: i for i, g in enumerate(self.groups)}
            self.group_of = np.fromiter((number[g] for g in keys), np.int32, len(keys))
        return self.groups, self.group_of


def make_buckets(pixel_budget: int, step: int = 64, max_aspect: float = 3.0) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of 16, width a multiple of `step`, w*h <= budget."""
    if step % 16:
        raise ValueError(f"bucket_step {step} is not a multiple of 16")
    out = []
    for w in range(step, int(math.sqrt(pixel_budget * max_aspect)) + 1, step):
        h = pixel_budget // w // 16 * 16
        if h >= 16 and 1 / max_aspect <= w / h <= max_aspect:
            out.append((w, h))
    if not out:
        raise ValueError(f"no buckets for pixel_budget {pixel_budget}, step {step}")
    return out


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> int:
    a = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - a))


def manifest_path(cfg: DataConfig) -> Path:
    """The manifest file `cfg.path` names (the file, or the folder's `cfg.manifest`); FileNotFoundError naming
    data.path if there is none (checked before a run does any work)."""
    path = Path(cfg.path)
    manifest = path if path.is_file() else path / cfg.manifest
    if not manifest.is_file():
        raise FileNotFoundError(f"data.path {cfg.path!r}: no manifest at {manifest}")
    return manifest


def index_manifest(cfg: DataConfig, max_sources: int | None = None) -> Index:
    """Read and validate the manifest (image headers only). Deterministic; same on every process.
    max_sources: items with more sources are skipped (Step1X-Edit takes one)."""
    manifest = manifest_path(cfg)
    base = manifest.parent
    buckets = make_buckets(cfg.pixel_budget, cfg.bucket_step, cfg.max_aspect)
    items, skipped, lines = [], Counter(), []

    def skip(n: int, reason: str, detail: str = "") -> None:
        skipped[reason] += 1
        lines.append(f"{manifest}:{n}: {detail or reason}")

    for n, d, bad in jsonl.read_lines(manifest):
        if bad is not None:
            skip(n, "bad manifest line", bad)
            continue
        try:
            srcs = d["sources"] if "sources" in d else [d["source"]]
            if "sources" in d and ("source" in d or not isinstance(srcs, list) or not srcs):
                raise TypeError("'sources' must be a non-empty list of paths, without 'source'")
            srcs, tgt, instr = [base / x for x in srcs], base / d["target"], d.get("instruction")
        except (KeyError, TypeError, AttributeError) as e:
            skip(n, "bad manifest line", f"not an object with string 'source' and 'target' ({type(e).__name__}: {e})")
            continue
        if max_sources is not None and len(srcs) > max_sources:
            skip(n, "too many sources", f"{len(srcs)} sources: this model trains with at most {max_sources}")
            continue
        if instr is None or isinstance(instr, str) and not instr.strip():
            skip(n, "empty instruction")
            continue
        try:
            instr = jsonl.check_text(instr, "instruction").strip()
        except ValueError as e:  # a list is refused, never trained on as its repr
            skip(n, "bad instruction", str(e))
            continue
        try:
            sizes = []
            for path in [*srcs, tgt]:
                with Image.open(path) as im:
                    sizes.append(displayed_size(im))  # (EXIF orientation applied)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never fatal
            skip(n, "unreadable image", f"unreadable image ({type(e).__name__}: {e})")
            continue
        *sa, sb = sizes
        if len(srcs) == 1 and sa[0] != sb:
            skip(n, "source/target sizes differ", f"source {sa[0]} and target {sb} sizes differ")
            continue
        if min(min(x) for x in sizes) < 16:
            skip(n, "image smaller than 16 px")
            continue
        more = tuple((p, nearest_bucket(buckets, *x)) for p, x in zip(srcs, sa)) if len(srcs) > 1 else ()
        items.append(Item(str(d.get("id", n - 1)), srcs[0], tgt, instr, nearest_bucket(buckets, *sb), more))
    if skipped:
        more = f"; and {len(lines) - 5} more" if len(lines) > 5 else ""
        log.warning("skipped %d manifest item(s) %s: %s%s", len(lines), dict(skipped), "; ".join(lines[:5]), more)
    return Index(items, buckets, skipped, lines)


def load_image(path: Path | IO[bytes], size: tuple[int, int]) -> np.ndarray:
    """Decode (a file, or encoded bytes in a file object), turn upright (EXIF orientation), resize to cover `size`
    (w, h), centre crop, LANCZOS -> [h, w, 3] float32 in [-1, 1]."""
    with Image.open(path) as im:
        im = upright(im, orientation(im)).convert("RGB")
        w, h = size
        s = max(w / im.width, h / im.height)
        rw, rh = max(w, round(im.width * s)), max(h, round(im.height * s))
        im = im.resize((rw, rh), Image.Resampling.LANCZOS)
        left, top = (rw - w) // 2, (rh - h) // 2
        im = im.crop((left, top, left + w, top + h))
        return np.asarray(im, np.float32) / 127.5 - 1.0


class Cache:
    """Memory-mapped cache arrays, checked against the current index."""

    def __init__(self, path: str | Path, index: Index, model: str | Path | None = None):
        """model: the run's model folder; its encoders and tokenizers must be the ones the cache was computed
        with (`model_folder.digest` of CACHED_PARTS), else ValueError naming the part that changed."""
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
        if model is not None:
            from jaxedit import model_folder

            now = model_folder.digest(model, CACHED_PARTS)
            changed = [p for p in CACHED_PARTS if (meta.get("parts") or {}).get(p) != now[p]]
            if changed:
                raise ValueError(
                    f"data.cache {self.path} was computed with other {', '.join(changed)} than model folder {model} "
                    f"holds now (cached from {meta.get('model')}): recompute it with python -m train.precompute"
                )
        load = lambda name: np.load(self.path / name, mmap_mode="r")  # noqa: E731
        self.txt, self.y, self.rows = load("txt.npy"), load("y.npy"), load("rows.npy")
        self.empty = (np.asarray(load("empty_txt.npy")), np.asarray(load("empty_y.npy")))
        self.latents = {}  # group -> {"target": [n_g, h, w, C], "reference": ..., "reference_1": ...}
        for g in sorted({it.group for it in index.items}):
            name = group_name(index.buckets, g)
            keys = ["target"] + [reference_key(i) for i in range(len(g[1]))]
            if (self.path / f"target_{name}.npy").is_file():
                self.latents[g] = {k: load(f"{k}_{name}.npy") for k in keys}

    def item(self, k: int, group: tuple) -> dict[str, np.ndarray]:
        r = int(self.rows[k])
        return {name: a[r] for name, a in self.latents[group].items()} | {"txt": self.txt[k], "y": self.y[k]}


class EditBatches:
    """Global batch index -> this process's part of that batch (a dict of numpy arrays and lists)."""

    def __init__(
        self, cfg: DataConfig, index: Index, process_index: int, process_count: int, model: str | Path | None = None
    ):
        """model: the run's model folder, checked against data.cache (see `Cache`)."""
        if cfg.batch_size % process_count:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {process_count} processes")
        self.cfg, self.index = cfg, index
        self.cache = Cache(cfg.cache, index, model) if cfg.cache else None
        self.local = cfg.batch_size // process_count
        self.lo = process_index * self.local
        # the items of group g (ascending): members[starts[g] : starts[g + 1]]
        self.groups, group_of = index.grouping()
        self.members = np.argsort(group_of, kind="stable").astype(np.int32)
        counts = np.bincount(group_of, minlength=len(self.groups))
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.per_epoch = int((counts // cfg.batch_size).sum())
        if self.per_epoch == 0:
            raise ValueError(
                f"no full batch of {cfg.batch_size}: {len(group_of)} usable items in buckets "
                f"{ {group_name(index.buckets, g): int(c) for g, c in zip(self.groups, counts)} }"
            )

    def group_members(self, g: int) -> np.ndarray:
        """The items of group number g (int32, ascending)."""
        return self.members[self.starts[g] : self.starts[g + 1]]

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs in flight at most
    def plan(self, epoch: int) -> np.ndarray:
        """Global batches of epoch `epoch`: item indices [per_epoch, batch_size] (int32), one group a row: each
        group's items permuted (in sorted group order, one generator seeded by (seed, epoch)), cut into batches (a
        partial one dropped), then the batch order permuted."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        size = self.cfg.batch_size
        parts = []
        for g in range(len(self.groups)):
            perm = rng.permutation(self.group_members(g))
            parts.append(perm[: len(perm) // size * size])
        batches = np.concatenate(parts).reshape(-1, size)
        return batches[rng.permutation(len(batches))]

    def batch(self, i: int) -> list[int]:
        """This process's items of global batch i."""
        return self.plan(i // self.per_epoch)[i % self.per_epoch, self.lo : self.lo + self.local].tolist()

    def __call__(self, i: int) -> dict[str, Any]:
        batch = self.batch(i)
        if self.cache is not None:
            items = [self.cache.item(k, self.index.items[k].group) for k in batch]
            out = {k: np.stack([it[k] for it in items]) for k in items[0]}
            return out | {
                "instruction": [self.index.items[k].instruction for k in batch],
                "id": [self.index.items[k].id for k in batch],
                "n_bad": 0,
            }
        out = {"instruction": [], "id": [], "n_bad": 0}
        images = []
        for k in batch:
            item, decoded = self._load_good(k, out)
            images.append(decoded)
            out["instruction"].append(item.instruction)
            out["id"].append(item.id)
        # "source" (the first source), "source_1", ... and "target": [b, H, W, 3] each
        return out | {name: np.stack([d[name] for d in images]) for name in images[0]}

    def _load_good(self, k: int, out: dict) -> tuple[Item, dict[str, np.ndarray]]:
        """Item k decoded ({"source": ..., "source_1": ..., "target": ...}); if it fails, the next items of its
        group (cyclically)."""
        g = int(self.index.grouping()[1][k])
        group, same = self.groups[g], self.group_members(g)
        start = int(np.searchsorted(same, k))
        for j in range(len(same)):
            item = self.index.items[same[(start + j) % len(same)]]
            try:
                return self.decode(item)
            except Exception as e:  # noqa: BLE001 - a bad file is counted, never fatal
                log.warning("skipping item %s: %s", getattr(item, "id", item), e)
                out["n_bad"] += 1
        raise RuntimeError(f"every item of bucket {group_name(self.index.buckets, group)} fails to decode")

    def decode(self, item: Item) -> tuple[Item, dict[str, np.ndarray]]:
        """(item, {"source": ..., "source_1": ..., "target": ...}) of an item (a reader of other storage overrides
        this: the item it returns carries the id and instruction)."""
        sizes = self.index.buckets
        decoded = {"source" if i == 0 else f"source_{i}": load_image(p, sizes[b])
                   for i, (p, b) in enumerate(item.source_list())}  # fmt: skip
        return item, decoded | {"target": load_image(item.target, sizes[item.bucket])}

    def sample_items(self, n: int, out_dir: Path) -> list[Item]:
        """The first `n` items, with image paths (sample edits read them)."""
        return self.index.items[:n]


def make_iterator(
    cfg: DataConfig, epochs: int = 10_000, model: str | Path | None = None, max_sources: int | None = None
) -> tuple[grain.DatasetIterator, EditBatches]:
    """A checkpointable grain iterator over this process's batch slices (`epochs` passes); model: the run's
    model folder (a data.cache must have been computed with its encoders); max_sources: see `index_manifest`."""
    index = index_manifest(cfg, max_sources)
    batches = EditBatches(cfg, index, jax.process_index(), jax.process_count(), model)
    ds = grain.MapDataset.range(batches.per_epoch * epochs).map(batches)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
    return iter(it), batches
