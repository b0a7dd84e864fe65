"""One writer at a time: a lock file (the kernel's flock, so a killed holder's lock is free at once) that names
its holder, so the process refused can say who is writing."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path


class Busy(RuntimeError):
    """Another process holds the lock; the message names what it is writing and who it is."""


@contextlib.contextmanager
def exclusive(lock: Path, busy: str, advice: str = "", error: type[Busy] = Busy) -> Iterator[None]:
    """Hold the lock file `lock` for the block, or raise `error` "<busy> (pid N on HOST, since T): <advice>" at
    once if another process holds it. The file is removed on release, while still locked; a process that opened
    it before then finds, once it has the lock, that the path names another file (or none) and starts over."""
    while True:
        f = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise error(f"{busy} ({holder})" + (f": {advice}" if advice else "")) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the holder we waited on removed it: lock the file now at that path
    try:
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        f.close()
