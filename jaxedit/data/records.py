"""The packed dataset format: ArrayRecord shards of one record per example, and the dataset's index.

    DATASET/index.json                 written last: its presence marks a complete dataset
    DATASET/sizes.npy                  int32 [examples, 1 + sources, 2]: (width, height) of the target, then of
                                       each source ((0, 0): no such source): the reader plans epochs from it
                                       without reading a record
    DATASET/shards/NNNNN.array_record  the examples, in input order (shard by shard)
    DATASET/bad_rows.jsonl             {"where": ..., "reason": ..., "detail": ...} of each row the pack skipped
    DATASET/progress/NNNNN.json        a pack's record of each finished shard (what a resumed pack skips)

A record: b"JXR1", a 4-byte little-endian header length, the header (UTF-8 JSON: id, instruction, the displayed
(EXIF-applied) size of each image, each image's byte length, the aspect bucket (target, sources) under the pack's
bucket settings), then the encoded image files (sources in order, then the target): the bytes as the input held
them, never decoded. The index holds the counts, the pack's bucket settings and buckets, the examples per group,
and per shard its path, record count, byte size and sha256.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxedit import jsonl
from jaxedit.data import paths
from jaxedit.image_files import displayed_size
from jaxedit.train.data import group_name, make_buckets, nearest_bucket

INDEX = "index.json"
SIZES = "sizes.npy"
BAD_ROWS = "bad_rows.jsonl"
FORMAT = "jaxedit-records"
VERSION = 1
MAGIC = b"JXR1"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads one example


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    instruction: str
    sources: tuple[bytes, ...]  # encoded image files, in order
    target: bytes
    sizes: tuple[tuple[int, int], ...]  # displayed (width, height) of each source, then the target
    bucket: tuple[int, tuple[int, ...]] = (-1, ())  # (target bucket, source buckets) under the pack's settings

    def source_sizes(self) -> tuple[tuple[int, int], ...]:
        return self.sizes[:-1]


class BadRow(Exception):
    """A row the pack skips: `reason` (counted), `detail` (recorded)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail or reason


def frame(magic: bytes, header: dict, payloads) -> bytes:
    """A record: `magic` (4 bytes), the header's length (4 bytes, little-endian), the header (UTF-8 JSON), then
    the payloads' bytes (the dataset's records and the cache's, `jaxedit.data.cache`)."""
    h = json.dumps(header, ensure_ascii=False).encode()
    return b"".join([magic, struct.pack("<I", len(h)), h, *payloads])


def unframe(record: bytes, magic: bytes, what: str) -> tuple[dict, int]:
    """(header, where the payloads start) of a `frame`d record; ValueError naming `what` if it is not one."""
    if record[:4] != magic or len(record) < 8:
        raise ValueError(f"not a {what}")
    (n,) = struct.unpack("<I", record[4:8])
    try:
        return json.loads(record[8 : 8 + n]), 8 + n
    except ValueError:
        raise ValueError(f"{what.removeprefix('jaxedit ')} header is not JSON (truncated?)") from None


def encode(ex: Example) -> bytes:
    images = [*ex.sources, ex.target]
    header = {"id": ex.id, "instruction": ex.instruction, "sizes": [list(s) for s in ex.sizes],
              "lengths": [len(b) for b in images], "bucket": [ex.bucket[0], list(ex.bucket[1])]}  # fmt: skip
    return frame(MAGIC, header, images)


def decode(record: bytes) -> Example:
    """The example a record holds; ValueError if it is not one (another format, truncated)."""
    h, start = unframe(record, MAGIC, "jaxedit record")
    n = start - 8
    at, images = start, []
    for length in h["lengths"]:
        images.append(record[at : at + length])
        at += length
    if at != len(record):
        raise ValueError(f"record holds {len(record) - 8 - n} image bytes, its header says {at - 8 - n}")
    sizes = tuple(tuple(s) for s in h["sizes"])
    bucket = (h["bucket"][0], tuple(h["bucket"][1]))
    return Example(h["id"], h["instruction"], tuple(images[:-1]), images[-1], sizes, bucket)


def image_size(data: bytes | None, what: str) -> tuple[int, int]:
    """Displayed size of an encoded image, decoded in full (a truncated file is caught here, not in training)."""
    if not data:
        raise BadRow("missing image", f"{what}: no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = displayed_size(im)
            im.load()
    except Exception as e:  # noqa: BLE001 - any undecodable image is a bad row, never fatal
        raise BadRow("image does not decode", f"{what}: {type(e).__name__}: {e}") from None
    return size


def check(
    id: str, instruction: Any, sources: list[bytes | None], target: bytes | None, buckets: list[tuple[int, int]]
) -> Example:
    """The example of one input row, validated as the folder reader validates a manifest line (the same reasons),
    and its images decoded in full; BadRow if it is not usable."""
    if not sources:
        raise BadRow("bad manifest line", "no source image")
    if instruction is None or isinstance(instruction, str) and not instruction.strip():
        raise BadRow("empty instruction")
    try:
        instruction = jsonl.check_text(instruction, "instruction").strip()
    except ValueError as e:
        raise BadRow("bad instruction", str(e)) from None
    names = ["source" if i == 0 else f"source_{i}" for i in range(len(sources))]
    sizes = [image_size(b, n) for b, n in zip([*sources, target], [*names, "target"])]
    if len(sources) == 1 and sizes[0] != sizes[1]:
        raise BadRow("source/target sizes differ", f"source {sizes[0]} and target {sizes[1]} sizes differ")
    if min(min(s) for s in sizes) < 16:
        raise BadRow("image smaller than 16 px")
    bucket = (nearest_bucket(buckets, *sizes[-1]), tuple(nearest_bucket(buckets, *s) for s in sizes[:-1]))
    return Example(str(id), instruction, tuple(sources), target, tuple(sizes), bucket)


@dataclasses.dataclass(frozen=True)
class BucketSettings:
    pixel_budget: int = 512 * 512
    bucket_step: int = 64
    max_aspect: float = 3.0

    def buckets(self) -> list[tuple[int, int]]:
        return make_buckets(self.pixel_budget, self.bucket_step, self.max_aspect)


def read_index(dataset: str) -> dict:
    """The index of a packed dataset; FileNotFoundError / ValueError naming the dataset if it is not one."""
    url = paths.join(dataset, INDEX)
    try:
        index = json.loads(paths.read_bytes(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"{dataset}: no {INDEX} (not a packed dataset, or its pack did not finish)") from None
    except ValueError as e:
        raise ValueError(f"{url}: not JSON ({e})") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{url}: not a {FORMAT} v{VERSION} index")
    return index


def is_packed(dataset: str) -> bool:
    """Whether `dataset` is a packed dataset (holds an index file)."""
    try:
        return bool(dataset) and paths.exists(paths.join(dataset, INDEX))
    except (OSError, ValueError):
        return False


def read_sizes(dataset: str) -> np.ndarray:
    return np.load(io.BytesIO(paths.read_bytes(paths.join(dataset, SIZES))))


def describe(index: dict) -> str:
    """`jaxedit data info`'s text."""
    total = sum(s["bytes"] for s in index["shards"])
    lines = [
        f"{index['examples']} examples in {len(index['shards'])} shards, {total / 1e6:.1f} MB "
        f"(at most {index['max_sources']} source(s) an example)",
        f"packed from {index['input']} in {index['seconds']:.1f}s; {index['rows']} rows read, "
        f"{sum(index['bad_rows'].values())} bad: {dict(index['bad_rows'])}",
        "buckets ({pixel_budget} px, step {bucket_step}, aspect <= {max_aspect}):".format(**index["settings"]),
    ]
    lines += [f"  {g}: {n}" for g, n in sorted(index["groups"].items(), key=lambda x: -x[1])]
    lines += ["shards:"] + [f"  {s['path']}: {s['records']} records, {s['bytes']} bytes, sha256 {s['sha256']}"
                            for s in index["shards"]]  # fmt: skip
    return "\n".join(lines)


def verify(dataset: str) -> list[str]:
    """One line for each shard whose size or sha256 differs from the index's (or that is missing)."""
    bad = []
    for s in read_index(dataset)["shards"]:
        url = paths.join(dataset, s["path"])
        try:
            digest, size = paths.sha256_of(url)
        except FileNotFoundError:
            bad.append(f"shard {url}: missing")
            continue
        if (digest, size) != (s["sha256"], s["bytes"]):
            bad.append(f"shard {url}: sha256 {digest[:16]}... ({size} bytes) does not match the index's "
                       f"{s['sha256'][:16]}... ({s['bytes']} bytes)")  # fmt: skip
    return bad


def count_groups(examples_buckets: list[tuple[int, tuple[int, ...]]], buckets: list[tuple[int, int]]) -> dict:
    return dict(Counter(group_name(buckets, g) for g in examples_buckets))


def shard_paths(dataset: str, index: dict, copies: str = "", verify: bool = False) -> list[str]:
    """Local paths of the dataset's shards (remote ones copied; checked: ValueError naming a shard that is not
    what the index says)."""
    out = []
    for s in index["shards"]:
        url = paths.join(dataset, s["path"])
        if not paths.is_local(url):
            out.append(str(paths.local_copy(url, s["sha256"], copies)))
            continue
        local = Path(paths.filesystem(url)[1])
        if not local.is_file():
            raise ValueError(f"shard {url}: missing")
        if local.stat().st_size != s["bytes"]:
            raise ValueError(f"shard {url}: {local.stat().st_size} bytes, the index says {s['bytes']}")
        if verify and paths.sha256_of(str(local))[0] != s["sha256"]:
            raise ValueError(f"shard {url}: sha256 does not match the index's (run jaxedit data verify)")
        out.append(str(local))
    return out
