"""What `jaxedit data pack` reads: the rows of a manifest folder, of Parquet shards or of webdataset tar shards,
cut into tasks (one output shard each, in input order) that read their rows independently.

Folder: `DATA/manifest.jsonl` (or the manifest file) as `jaxedit.train.data` reads it: a task is `shard_size`
lines; ids default to the line number - 1, as there.

Parquet (pyarrow, the `data` extra): one task per file; image cells are bytes, or HF datasets' image structs
{"bytes": ..., "path": ...}; `--source-column` names each source's column in order, `--target-column`,
`--instruction-column`, optional `--id-column` (default FILE:ROW). A missing column makes each row of the file bad.

Tar, in the webdataset convention (https://github.com/webdataset/webdataset: the files of one example are
consecutive members sharing a key, the member's path up to the first dot of its file name; the rest is the field):
one task per tar file;
    KEY.src.png  (or KEY.source.*)     the first source; KEY.src_1.jpg, KEY.src_2.* ... further ones, in order
    KEY.tgt.png  (or KEY.target.*)     the target
    KEY.txt      (or KEY.instruction.txt)  the instruction, UTF-8; or KEY.json {"instruction": ..., "id": ...}
the id is "instruction"'s json "id", else KEY.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from jaxedit import jsonl
from jaxedit.data import paths
from jaxedit.data.records import BadRow

# one row: (where, {"id", "instruction", "sources", "target"}) or (where, BadRow)
Row = tuple[str, dict[str, Any] | BadRow]
PARQUET_EXTRA = "reading Parquet needs pyarrow: pip install 'jaxedit[data]'"


def read_or_none(url: str) -> bytes | None:
    try:
        return paths.read_bytes(url)
    except (FileNotFoundError, IsADirectoryError, OSError):
        return None


@dataclasses.dataclass
class FolderSource:
    path: str  # the folder holding manifest.jsonl, or the manifest
    shard_size: int = 1000
    manifest: str = "manifest.jsonl"
    _lines: list[bytes] | None = dataclasses.field(default=None, repr=False)

    def manifest_url(self) -> str:
        fs, p = paths.filesystem(self.path)
        url = self.path if fs.isfile(p) else paths.join(self.path, self.manifest)
        if not paths.exists(url):
            raise FileNotFoundError(f"{self.path}: no manifest at {url}")
        return url

    def lines(self) -> list[bytes]:
        """The manifest's lines (read once; the tasks share them)."""
        if self._lines is None:
            self._lines = paths.read_bytes(self.manifest_url()).splitlines(keepends=True)
        return self._lines

    def tasks(self) -> list[Any]:
        n = len(self.lines())
        return [[a, min(a + self.shard_size, n)] for a in range(0, n, self.shard_size)]

    def rows(self, task: Any) -> Iterator[Row]:
        url = self.manifest_url()
        base = url.rsplit("/", 1)[0]
        a, b = task
        lines = self.lines()[a:b]
        for n, d, bad in jsonl.parse_lines(lines, first=a + 1):
            where = f"{url}:{n}"
            if bad is not None:
                yield where, BadRow("bad manifest line", bad)
                continue
            try:
                srcs = d["sources"] if "sources" in d else [d["source"]]
                if "sources" in d and ("source" in d or not isinstance(srcs, list) or not srcs):
                    raise TypeError("'sources' must be a non-empty list of paths, without 'source'")
                srcs = [paths.join(base, x) for x in srcs]
                tgt = paths.join(base, d["target"])
            except (KeyError, TypeError, AttributeError) as e:
                detail = f"not an object with string 'source' and 'target' ({type(e).__name__}: {e})"
                yield where, BadRow("bad manifest line", detail)
                continue
            instruction = d.get("instruction")
            if instruction is None or isinstance(instruction, str) and not instruction.strip():
                yield where, BadRow("empty instruction")  # (before any image is read, as the folder reader)
                continue
            images = [read_or_none(u) for u in [*srcs, tgt]]
            if any(x is None for x in images):
                missing = [u for u, x in zip([*srcs, tgt], images) if x is None]
                yield where, BadRow("unreadable image", f"unreadable image ({', '.join(missing)})")
                continue
            row = {"id": d.get("id", n - 1), "instruction": instruction, "sources": images[:-1]}
            yield where, row | {"target": images[-1]}


def expand(inputs: list[str], suffix: str) -> list[str]:
    """Input URLs: files as given, folders as their `*suffix` files, globs expanded; sorted within each."""
    out = []
    for url in inputs:
        fs, p = paths.filesystem(url)
        protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
        if any(c in p for c in "*?["):
            found = sorted(fs.glob(p))
        elif fs.isdir(p):
            found = sorted(x for x in fs.find(p) if x.endswith(suffix))
        else:
            found = [p]
        out += [protocol + x if protocol and not x.startswith(protocol) else x for x in found]
    if not out:
        raise FileNotFoundError(f"no {suffix} files in {', '.join(inputs)}")
    return out


def cell_bytes(value: Any) -> bytes | None:
    """An image cell: bytes, or an HF datasets image struct {"bytes": ..., "path": ...}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) and len(value) else None


@dataclasses.dataclass(frozen=True)
class ParquetSource:
    inputs: tuple[str, ...]
    source_columns: tuple[str, ...] = ("source",)
    target_column: str = "target"
    instruction_column: str = "instruction"
    id_column: str = ""

    def tasks(self) -> list[Any]:
        parquet()
        return expand(list(self.inputs), ".parquet")

    def rows(self, task: Any) -> Iterator[Row]:
        pq = parquet()
        fs, p = paths.filesystem(task)
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            wanted = [*self.source_columns, self.target_column, self.instruction_column]
            wanted += [self.id_column] if self.id_column else []
            missing = [c for c in wanted if c not in names]
            n = 0
            if missing:
                bad = BadRow("missing column", f"no column {', '.join(missing)} (columns: {', '.join(sorted(names))})")
                for i in range(pf.metadata.num_rows):
                    yield f"{task}:{i}", bad
                return
            for batch in pf.iter_batches(batch_size=64, columns=wanted):
                for r in batch.to_pylist():
                    where, n = f"{task}:{n}", n + 1
                    ident = r[self.id_column] if self.id_column else f"{posixpath.basename(task)}:{n - 1}"
                    yield where, {"id": ident, "instruction": r[self.instruction_column],
                                  "sources": [cell_bytes(r[c]) for c in self.source_columns],
                                  "target": cell_bytes(r[self.target_column])}  # fmt: skip


def parquet():
    """pyarrow.parquet, or ImportError in one line naming the extra."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(PARQUET_EXTRA) from None
    return pq


SOURCE_FIELD = re.compile(r"^(?:src|source)(?:_(\d+))?\.[^.]+$")
TARGET_FIELD = re.compile(r"^(?:tgt|target)\.[^.]+$")


@dataclasses.dataclass(frozen=True)
class TarSource:
    inputs: tuple[str, ...]

    def tasks(self) -> list[Any]:
        return expand(list(self.inputs), ".tar")

    def rows(self, task: Any) -> Iterator[Row]:
        fs, p = paths.filesystem(task)
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key, fields = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                folder, name = posixpath.split(m.name)
                if "." not in name:
                    continue
                stem, field = name.split(".", 1)
                k = posixpath.join(folder, stem)
                if k != key and key is not None:
                    yield self.row(task, key, fields)
                    fields = {}
                key = k
                fields[field] = tar.extractfile(m).read()
            if key is not None:
                yield self.row(task, key, fields)

    @staticmethod
    def row(task: str, key: str, fields: dict[str, bytes]) -> Row:
        where = f"{task}:{key}"
        sources, target, meta, instruction = {}, None, {}, None
        for field, data in fields.items():
            if m := SOURCE_FIELD.match(field):
                sources[int(m.group(1) or 0)] = data
            elif TARGET_FIELD.match(field):
                target = data
            elif field in ("txt", "instruction.txt"):
                try:
                    instruction = data.decode("utf-8")
                except UnicodeDecodeError:
                    return where, BadRow("bad instruction", f"{field} is not UTF-8 text")
            elif field == "json":
                try:
                    meta = json.loads(data)
                except ValueError as e:
                    return where, BadRow("bad manifest line", f"{field}: invalid JSON ({e})")
                if not isinstance(meta, dict):
                    return where, BadRow("bad manifest line", f"{field} is not an object")
        if instruction is None:
            instruction = meta.get("instruction")
        if sorted(sources) != list(range(len(sources))):
            return where, BadRow("bad manifest line", f"sources numbered {sorted(sources)}: not 0, 1, ...")
        return where, {"id": meta.get("id", key), "instruction": instruction,
                       "sources": [sources[i] for i in sorted(sources)], "target": target}  # fmt: skip
