"""Staged writes: whatever replaces something is written beside it, then renamed over it (one rename: a reader
sees the old or the new, never a part), for files and for folders. Every writer that replaces a file or a
folder goes through here.

    with staged_file(path) as tmp:      # .NAME.PID.tmp beside `path` (this process's: never another's)
        tmp.write_bytes(data)           # renamed over `path` when the block ends; removed if it raises
    write_file(path, text)              # the same, for bytes or text in hand
    with staged_dir(dst) as new:        # .NAME.new beside `dst`, emptied first
        ...                             # renamed over `dst` when the block ends (`replace_dir`); removed if it raises

sync=True fsyncs what was written and the folder that holds it (the seals of `jaxedit.checkpoint` do). A folder's
replacement is two renames (the old copy moved aside as .NAME.old, the new one renamed in); `recover_dir`
finishes one cut between them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(d: Path) -> None:
    """fsync a folder (its entries: a rename inside it is durable)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(f: Path) -> None:
    with open(f, "rb") as fh:
        os.fsync(fh.fileno())


def temp_path(path: Path) -> Path:
    """Where a file replacing `path` is written first: .NAME.PID.tmp beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, *, sync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed over `path` when the block ends (after an fsync of the
    file with sync=True), removed if the block raises."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if sync:
            fsync_file(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def write_file(path: str | os.PathLike, data: bytes | str, *, sync: bool = False) -> Path:
    """Replace `path`'s contents with `data` (bytes, or text written as UTF-8) in one rename (`staged_file`)."""
    path = Path(path)
    with staged_file(path, sync=sync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def remove(path: Path) -> None:
    """Delete a folder, a file or a link, never following a link (a link to a folder goes, the folder stays)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def new_dir(dst: Path) -> Path:
    """Where a folder replacing `dst` is written first: .NAME.new beside it."""
    return dst.with_name(f".{dst.name}.new")


def replace_dir(new: Path, dst: Path) -> None:
    """Rename the complete folder `new` to `dst`; an existing `dst` is moved aside first and removed after."""
    old = dst.with_name(f".{dst.name}.old")
    remove(old)
    if dst.exists() or dst.is_symlink():
        dst.rename(old)
    new.rename(dst)
    fsync_dir(dst.parent)
    remove(old)


def recover_dir(dst: str | Path, complete: str) -> None:
    """Finish a replacement of `dst` cut between its two renames: a missing `dst` whose complete new copy
    (.NAME.new holding `complete`, the file written last) or old copy (.NAME.old) is beside it is put back;
    leftovers beside an existing `dst` go."""
    dst = Path(dst)
    new, old = new_dir(dst), dst.with_name(f".{dst.name}.old")
    if not dst.exists():
        if (new / complete).is_file():
            new.rename(dst)
        elif old.is_dir():
            old.rename(dst)
    if dst.exists():
        for leftover in (new, old):
            if leftover.exists():
                shutil.rmtree(leftover)


@contextlib.contextmanager
def staged_dir(dst: str | os.PathLike) -> Iterator[Path]:
    """An empty folder beside `dst` (.NAME.new; a leftover one is emptied) to fill; renamed over `dst` when the
    block ends (`replace_dir`), removed if the block raises (a partial copy is never left behind)."""
    dst = Path(dst)
    new = new_dir(dst)
    if new.exists():
        shutil.rmtree(new)
    new.mkdir(parents=True)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    replace_dir(new, dst)
