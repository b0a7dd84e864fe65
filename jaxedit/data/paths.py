"""Paths anywhere fsspec reaches: a local path stays a local path (and its replacing writes go through
`jaxedit.staged`), `memory://...`, `gs://...` (with gcsfs installed) and the like are opened by their filesystem.

ArrayRecord's reader and writer open local files only; a remote shard is written locally and uploaded whole, and
read from a local copy (`local_copy`: fetched once, its sha256 checked against the dataset index on the way, kept
under the copies folder by checksum so a restart reuses it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from jaxedit import staged

CHUNK = 1 << 22


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of `url`."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes | str) -> None:
    """Replace `url`'s contents: a local file in one rename (`jaxedit.staged`), a remote object in one upload."""
    data = data.encode() if isinstance(data, str) else data
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        staged.write_file(path, data)
    else:
        fs.pipe_file(path, data)


@contextlib.contextmanager
def written_at(url: str) -> Iterator[Path]:
    """A local path to write the file that becomes `url` when the block ends: beside it and renamed in for a local
    `url` (`jaxedit.staged`), a temporary file uploaded whole otherwise; nothing is left at `url` if the block
    raises."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with staged.staged_file(path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="jaxedit-") as d:
        tmp = Path(d) / Path(path).name
        yield tmp
        fs.put_file(str(tmp), path)


def sha256_of(url: str) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file."""
    fs, path = filesystem(url)
    h, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def default_copies() -> Path:
    return Path(os.environ.get("JAXEDIT_DATA_COPIES") or Path(tempfile.gettempdir()) / "jaxedit-shards")


def local_copy(url: str, sha256: str, copies: str | Path = "") -> Path:
    """A local path holding the file at `url` whose sha256 must be `sha256`: the file itself if local, else a copy
    under `copies` (fetched once, checked on the way; ValueError naming the file if its checksum differs)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    dst = Path(copies or default_copies()) / sha256[:32] / Path(path).name
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with staged.staged_file(dst) as tmp, fs.open(path, "rb") as src, open(tmp, "wb") as out:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
        if h.hexdigest() != sha256:
            raise ValueError(f"shard {url}: sha256 {h.hexdigest()[:16]}... does not match the index's {sha256[:16]}...")
    return dst
