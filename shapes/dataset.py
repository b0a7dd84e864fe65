"""Dataset files of the shapes task: `DIR/{src,tgt}/<i>.png` + `DIR/manifest.jsonl`, as
`jaxedit.train.data` reads them.
"""

from __future__ import annotations

import json
import multiprocessing
import struct
import zlib
from pathlib import Path

import numpy as np

from shapes.task import EDIT_TYPES, edit_of, sample, seed_for

# ----------------------------------------------------------------------------- dataset files


def png_bytes(image: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG file bytes (8-bit RGB, no filter, zlib level 1).

    Five times faster than Pillow's encoder on 64x64 images, where its per-call overhead dominates.
    """
    h, w, _ = image.shape
    raw = np.zeros((h, 1 + 3 * w), np.uint8)  # each row: filter type 0, then the pixels
    raw[:, 1:] = image.reshape(h, 3 * w)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no filter, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


def _write_one(args: tuple[str, str, int, int]) -> str:
    out_dir, split, i, size = args
    s = sample(split, i, size)
    Path(f"{out_dir}/src/{i}.png").write_bytes(png_bytes(s.source))
    Path(f"{out_dir}/tgt/{i}.png").write_bytes(png_bytes(s.target))
    rec = {
        "id": f"{split}-{i}",
        "source": f"src/{i}.png",
        "target": f"tgt/{i}.png",
        "instruction": s.instruction,
        "edit": s.edit,
        "split": split,
        "index": i,
    }
    return json.dumps(rec)


def parse_edit_weights(spec: str) -> dict[str, float]:
    """`"remove=2,move=2"` -> {"remove": 2.0, "move": 2.0} (unlisted edits weigh 1)."""
    weights = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in EDIT_TYPES:
            raise ValueError(f"edit weight {item!r}: expected <edit>=<weight> with <edit> one of {list(EDIT_TYPES)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"edit weight {item!r}: {value!r} is not a number") from None
    return weights


_KEEP_STREAM = 0x5E1EC7  # a second random stream per seed, independent of the sample's own


def select_indices(split: str, count: int, start: int = 0, edit_weights: dict[str, float] | None = None) -> list[int]:
    """`count` indices of `split` from `start` on. With `edit_weights` (edit -> relative weight,
    default 1), index i is kept with probability weight(edit_of(i)) / max weight, decided by a second
    random stream seeded by (split, i): the same indices for the same arguments, and each kept pair
    is still `sample(split, i)`."""
    if not edit_weights:
        return list(range(start, start + count))
    w = {e: float(edit_weights.get(e, 1.0)) for e in EDIT_TYPES}
    if unknown := set(edit_weights) - set(EDIT_TYPES):
        raise ValueError(f"edit weights name unknown edits {sorted(unknown)}; edits are {list(EDIT_TYPES)}")
    if min(w.values()) < 0 or max(w.values()) <= 0:
        raise ValueError(f"edit weights must be >= 0 with one > 0, got {w}")
    top = max(w.values())
    out, i = [], start
    while len(out) < count:
        seed = seed_for(split, i)  # also the range check
        if np.random.default_rng([_KEEP_STREAM, seed]).random() < w[edit_of(split, i)] / top:
            out.append(i)
        i += 1
    return out


def write_split(
    out_dir: str | Path,
    split: str,
    count: int,
    size: int = 64,
    start: int = 0,
    processes: int = 1,
    edit_weights: dict[str, float] | None = None,
) -> Path:
    """Write `count` samples of `split` (indices start.. ; with `edit_weights` a weighted choice of
    them, `select_indices`) as out_dir/{src,tgt}/{i}.png + manifest.jsonl.

    The manifest (one JSON object a line: id, source, target, instruction, edit, split, index)
    is what `jaxedit.train.data` reads. Returns the manifest's path.
    """
    seed_for(split, start)  # range checks before writing anything
    seed_for(split, start + max(count, 1) - 1)
    indices = select_indices(split, count, start, edit_weights)
    out = Path(out_dir)
    (out / "src").mkdir(parents=True, exist_ok=True)
    (out / "tgt").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), split, i, size) for i in indices]
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            lines = list(pool.imap(_write_one, jobs, chunksize=256))
    else:
        lines = [_write_one(j) for j in jobs]
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(line + "\n" for line in lines))
    return manifest


def write_benchmark(out_dir: str | Path, split: str = "test", count: int = 240, size: int = 64) -> Path:
    """`jaxedit eval`'s pairs layout of samples 0..count-1 of `split`: DIR/sources/<i>.png, DIR/targets/<i>.png and
    DIR/benchmark.jsonl ({"id", "category": the edit type, "instruction", "source", "target", "seed": the index, as
    benchmarks/demo_quality.py seeds them})."""
    out = Path(out_dir)
    (out / "sources").mkdir(parents=True, exist_ok=True)
    (out / "targets").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        s = sample(split, i, size)
        (out / "sources" / f"{i}.png").write_bytes(png_bytes(s.source))
        (out / "targets" / f"{i}.png").write_bytes(png_bytes(s.target))
        lines.append(json.dumps({"id": f"{split}-{i}", "category": s.edit, "instruction": s.instruction,
                                 "source": f"sources/{i}.png", "target": f"targets/{i}.png", "seed": i}))  # fmt: skip
    path = out / "benchmark.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
