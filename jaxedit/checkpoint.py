"""Orbax checkpoints of parameter pytrees (what the converters write and the models read), sealed.

Every checkpoint written here is written beside its destination (`.NAME.new`), sealed (each file's size
and sha256 in `jaxedit_sha256.json`, every file fsynced) and only then renamed into place; a checkpoint
it replaces is moved aside (`.NAME.old`) and removed once the new one is in place (`recover_dir` finishes
a swap that was cut between the two renames). Loading verifies the seal first, so a flipped byte or a
truncated file is named instead of loaded: about 0.7 s per GB on one core of this 2-core machine, files
hashed in parallel (JAXEDIT_VERIFY=0 skips it). Directories of other files (tokenizers) are sealed the
same way (`seal` / `verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxedit import staged
from jaxedit.staged import remove, replace_dir  # noqa: F401 (also used from here: the converter, the tests)

CHECKSUMS = "jaxedit_sha256.json"
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint that is damaged or cannot be read; the message names the folder and file."""


def verify_enabled() -> bool:
    """False when JAXEDIT_VERIFY=0 (skip the checksum verification of loads)."""
    return os.environ.get("JAXEDIT_VERIFY", "1").strip().lower() not in ("0", "false", "no", "off")


def _file_digest(f: Path, sync: bool = False) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return f.stat().st_size, h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def seal(root: str | Path) -> dict[str, list]:
    """Record every file's size and sha256 under `root` in ROOT/jaxedit_sha256.json (fsyncing each file and
    directory on the way, the record written beside and renamed). Returns {relative path: [size, sha256]}."""
    root = Path(root)
    files = _files(root)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        sums = dict(zip((str(f.relative_to(root)) for f in files), pool.map(lambda f: _file_digest(f, True), files)))
    lines = [f"  {json.dumps(k)}: [{size}, {json.dumps(h)}]" for k, (size, h) in sums.items()]
    with staged.staged_file(root / CHECKSUMS, sync=True) as tmp:
        tmp.write_text('{"sha256": {\n' + ",\n".join(lines) + "\n}}\n")
    for d in {root, *(f.parent for f in files)}:
        staged.fsync_dir(d)
    return {k: list(v) for k, v in sums.items()}


def verify(root: str | Path) -> bool:
    """Check every file recorded in ROOT/jaxedit_sha256.json (size, then sha256); CheckpointError naming the
    first damaged or missing file. False (nothing checked) when ROOT has no record."""
    root = Path(root)
    record = root / CHECKSUMS
    if not record.is_file():
        return False
    try:
        sums = json.loads(record.read_text())["sha256"]
        sums = {str(k): (int(v[0]), str(v[1])) for k, v in sums.items()}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{record}: damaged checksum record ({type(e).__name__}: {e})") from None

    def problem(rel: str) -> str | None:
        f = root / rel
        size, digest = sums[rel]
        if not f.is_file():
            return "missing"
        if f.stat().st_size != size:
            return f"{f.stat().st_size} bytes where {size} were written (truncated or replaced)"
        return None if _file_digest(f)[1] == digest else "contents changed since it was written (sha256 mismatch)"

    names = sorted(sums)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for rel, bad in zip(names, pool.map(problem, names)):
            if bad:
                raise CheckpointError(f"{root}: file {rel} is damaged: {bad}; re-convert or restore {root.name}/")
    return True


def verify_or_note(path: Path) -> None:
    """`verify`, with a note on stderr when `path` has no seal to verify (written before seals existed)."""
    if not verify(path):
        print(f"note: {path} has no checksums (written by an older jaxedit), not verified; "
              f"`jaxedit-convert seal {path.parent}` adds them", file=sys.stderr)  # fmt: skip


def recover_dir(dst: str | Path, complete: str = CHECKSUMS) -> None:
    """Finish a replacement of `dst` cut between its two renames: a missing `dst` whose complete new copy
    (.NAME.new holding `complete`, the file written last) or old copy (.NAME.old) is beside it is put back;
    leftovers beside an existing `dst` go (`jaxedit.staged.recover_dir`; by default a checkpoint's: complete
    once sealed)."""
    staged.recover_dir(dst, complete)


def prepare_destination(dst: Path, *, force: bool, replaceable, what: str) -> None:
    """Fail in a second, before any source is read: `dst` exists and is not empty (without force), or is not
    a `what` (`replaceable(dst)` False: --force never deletes anything else), or nothing can be written
    beside it (read-only, not a folder)."""
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise FileExistsError(f"{dst} exists and is not empty (use --force to replace it)")
        if not replaceable(dst):
            raise FileExistsError(f"{dst} is not a {what}: --force replaces only a {what}; move it away yourself")
    probe = dst.with_name(f".{dst.name}.probe-{os.getpid()}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        (probe / "x").write_bytes(b"x")
    except OSError as e:
        raise PermissionError(f"cannot write beside {dst}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def is_checkpoint(path: Path) -> bool:
    """An Orbax checkpoint folder (what `save_params` writes)."""
    return (Path(path) / "_CHECKPOINT_METADATA").is_file()


def save_params(path: str | Path, params: Any, *, force: bool = False) -> Path:
    """Write `params` (nested dict of arrays) as a sealed Orbax checkpoint at `path`: written beside, sealed,
    renamed into place. force: replace an existing checkpoint (kept until the new one is complete).
    Collective on several processes (each writes its shards; the first process seals and renames)."""
    from jaxedit.parallel.distributed import sync

    path = Path(path).absolute()
    new = staged.new_dir(path)
    lead = jax.process_index() == 0
    if lead:
        recover_dir(path)
        if path.exists() and not force:
            raise FileExistsError(f"{path} exists (use force=True / --force to replace it)")
        if new.exists():
            shutil.rmtree(new)
    sync(f"save_params {path.name}: clean")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(new, params)
        ckptr.wait_until_finished()
    if lead:
        seal(new)
        replace_dir(new, path)
    sync(f"save_params {path.name}: in place")
    return path


def _read(path: Path, what: str, fn):
    """Orbax's failures to read a checkpoint (a deleted metadata file, a truncated data file) as one line."""
    try:
        return fn()
    except Exception as e:  # TensorStore raises bare Exceptions; out-of-memory is not the checkpoint's fault
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full")[0][:300]
        raise CheckpointError(f"{path}: cannot read this checkpoint's {what} ({type(e).__name__}: {msg})") from None


def param_metadata(path: str | Path) -> Any:
    """Shapes and dtypes stored in a checkpoint, as a pytree of ShapeDtypeStructs."""
    path = _existing(path)

    def read():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.metadata(path).item_metadata.tree

    meta = _read(path, "metadata", read)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta)


def as_stored_on(metadata: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `metadata`'s shapes and dtypes (e.g. `param_metadata`: a restore target) each carrying
    its sharding from `shardings` (a tree of NamedShardings of the same structure)."""
    return jax.tree.map(lambda m, w: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=w), metadata, shardings)


def load_params(
    path: str | Path,
    target: Any = None,
    *,
    dtype: Any = None,
    device: Any = None,
    verify_checksums: bool | None = None,
) -> Any:
    """Read a parameter checkpoint, its seal verified first (`verify`; verify_checksums=None: unless
    JAXEDIT_VERIFY=0; a checkpoint written before seals existed loads with a note).

    target: a pytree of `jax.ShapeDtypeStruct` (with `.sharding` for sharded restore,
    e.g. from `jax.eval_shape` + the sharding rules); each array is restored straight
    into its sharding. None: restore onto the default device as stored.
    dtype: cast every array to this dtype on restore (the target's dtypes are replaced), except quantised
    kernels and their scales (`jaxedit.quant`); without a target, onto this process's first device (each
    process of a multi-host run reads its own copy).
    device: without a target, restore every array onto this device (e.g. the host's CPU device).
    """
    path = _existing(path)
    if verify_enabled() if verify_checksums is None else verify_checksums:
        verify_or_note(path)
    if target is None and (dtype is not None or device is not None):
        dev = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), param_metadata(path))
    if dtype is not None:  # quantised kernels and their scales keep their dtypes
        from jaxedit.quant import cast

        target = cast(target, dtype)

    def read():
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, target)

    return _read(path, "arrays", read)


def _existing(path) -> Path:
    path = Path(path).absolute()
    if jax.process_index() == 0:
        recover_dir(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path
