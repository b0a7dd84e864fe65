"""Batch editing jobs: a JSONL manifest in, `DIR/<id>.png` + `DIR/results.jsonl` out.

Each manifest line: {"image": path, "prompt": str, optional "id", "seed", "steps",
"guidance", "width", "height"}; "images": [path, ...] instead of "image" gives several reference
images (a pipeline with `several_references`). A bad item (a line that is not UTF-8 or not JSON, a missing,
corrupt or huge image, a prompt that is empty, not a string or not valid Unicode, absurd
sizes, an id that would write outside DIR or is used twice) is recorded as failed with its
reason and the rest of the job completes; a fault of the program itself (out of memory, a
compile error) stops the job with `ProgramFault` and records nothing against the items.
Items with equal shapes (bucket, found from the images' headers) are batched; images are
decoded only for the batch about to run. A results line is appended (and flushed) as each
item finishes, so a killed job loses nothing finished; each carries a key of what produced
it (the item's inputs, its image's bytes, the model) and the sha256 of the PNG written, and a rerun
skips an item only if its latest result is ok, has the same key and its PNG has that hash, so what changed
(or was overwritten) runs again. One job writes a folder at a time (`output_lock`); each PNG is written
beside as a temporary of its process, then renamed.

The model side is any object with the `EditPipeline` methods below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from jaxedit import jsonl, locks
from jaxedit.image_files import displayed_size, orientation, upright
from jaxedit.options import MAX_GUIDANCE, MAX_STEPS
from jaxedit.staged import write_file

MAX_SIDE = 4096  # pixels; larger requests are refused as absurd
MIN_SIDE = 16
MAX_IMAGE_PIXELS = 8192 * 8192  # input images above this are refused from their header, before decoding
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ItemError(ValueError):
    """An item that cannot be processed; its message is the recorded reason."""


class OutputBusy(locks.Busy):
    """The output folder is being written by another batch job (it holds the folder's lock file)."""


class ProgramFault(RuntimeError):
    """Generation failed for a reason that is not the items' (out of memory, a compile or runtime error):
    the job stops without recording those items as failed, so a rerun retries them."""


class NonFiniteError(ValueError):
    """Some items of a batch came out with NaN or inf values (e.g. a LoRA or a setting that overflows): no image
    is made of them (a pipeline's `edit` raises it; the job fails those items alone). `images`: the batch's
    results, None in place of each such item; `bad`: their indices."""

    def __init__(self, images: list, bad: list[int]):
        self.images, self.bad = images, bad
        super().__init__(f"item(s) {', '.join(map(str, bad))} of the batch came out with NaN or inf values: no image "
                         "is written of them")  # fmt: skip


@dataclasses.dataclass
class EditItem:
    id: str
    image: str | None  # the first (or only) input image
    prompt: str
    seed: int
    steps: int
    guidance: float
    width: int | None = None
    height: int | None = None
    line: int = 0
    images: tuple[str, ...] = ()  # every input image ("images"; one: (image,))


class EditPipeline(Protocol):
    """An item's image is one image (size: (w, h)) or None; with `several_references` True (optional
    attribute) an item of several images passes a list of them (sizes: a list of (w, h))."""

    def bucket_for(self, size: tuple[int, int] | None, width: int | None, height: int | None) -> Any:
        """The `.bucket` `prepare` gives an image of `size` (w, h; None: no image), from the size alone.
        Raises ValueError."""

    def prepare(self, image: Image.Image | None, width: int | None, height: int | None) -> Any:
        """Preprocess one item; returns an object with `.bucket` (hashable shape key). Raises ValueError."""

    def edit(self, prepared: list[Any], prompts: list[str], seeds: list[int], guidance: list[float], steps: int):
        """Run one batch of items sharing a bucket; returns a list of PIL images."""


def default_seed(item_id: str) -> int:
    """A seed derived from the id, so re-runs reproduce items that gave none."""
    return zlib.crc32(item_id.encode()) & 0x7FFFFFFF


def _int_field(d: dict, name: str, lo: int, hi: int, default=None):
    v = d.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise ItemError(f"field {name!r} must be an integer, got {v!r}")
    if not lo <= int(v) <= hi:
        raise ItemError(f"field {name!r}={v} is outside [{lo}, {hi}]")
    return int(v)


def parse_item(d: Any, line: int, defaults: dict, base_dir: Path) -> EditItem:
    """Validate one manifest entry. Raises ItemError with the reason."""
    if not isinstance(d, dict):
        raise ItemError(f"expected a JSON object, got {type(d).__name__}")
    item_id = d.get("id", f"line{line:05d}")
    if not safe_id(item_id):
        raise ItemError(
            f"id {item_id!r} is not a safe file name (letters, digits, '.', '_', '-'; no path separators or '..')"
        )
    try:
        prompt = jsonl.check_text(d.get("prompt"), "prompt")
    except ValueError as e:
        raise ItemError(str(e)) from None
    if "images" in d and "image" in d:
        raise ItemError("give either field 'image' or field 'images' (a list of paths), not both")
    images = d["images"] if "images" in d else [d.get("image", defaults.get("image"))]
    if "images" in d and (not isinstance(images, list) or not images):
        raise ItemError(f"field 'images' must be a non-empty list of paths, got {images!r}")
    if images == [None]:
        images = []
        if not defaults.get("allow_no_image"):
            raise ItemError("field 'image' is missing (this model edits an input image)")
    for i, image in enumerate(images):
        if not isinstance(image, str) or not image:
            field = f"images[{i}]" if "images" in d else "image"
            raise ItemError(f"field {field!r} must be a path, got {image!r}")
    images = [str((base_dir / x) if not Path(x).is_absolute() else Path(x)) for x in images]
    guidance = d.get("guidance", defaults["guidance"])
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
        raise ItemError(f"field 'guidance' must be a finite number, got {guidance!r}")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise ItemError(f"field 'guidance'={guidance} is outside [0, {MAX_GUIDANCE:g}]")
    return EditItem(
        id=item_id,
        image=images[0] if images else None,
        images=tuple(images),
        prompt=prompt,
        seed=_int_field(d, "seed", 0, 2**31 - 1, default_seed(item_id)),
        steps=_int_field(d, "steps", 1, MAX_STEPS, defaults["steps"]),
        guidance=float(guidance),
        width=_int_field(d, "width", MIN_SIDE, MAX_SIDE),
        height=_int_field(d, "height", MIN_SIDE, MAX_SIDE),
        line=line,
    )


def safe_id(item_id: Any) -> bool:
    """Whether `item_id` can name a file in the output folder."""
    return isinstance(item_id, str) and bool(_ID_RE.match(item_id)) and ".." not in item_id


def read_manifest(path: Path, defaults: dict) -> tuple[list[EditItem], list[dict]]:
    """Items and failure records (lines that are not UTF-8, not JSON or not a valid item; duplicate ids) of a
    JSONL manifest. The first line naming an id owns it: a later line naming it again (valid or not) fails
    under its own line's id, so no failure ever stands in the results for another line's item."""
    items, failed, first = [], [], {}
    for line_no, d, bad in jsonl.read_lines(path):
        where, line_id = f"{path}:{line_no}", f"line{line_no:05d}"
        if bad is not None:
            failed.append(_failure(line_id, f"{where}: {bad}"))
            continue
        claimed = d.get("id", line_id) if isinstance(d, dict) else None
        claimed = claimed if safe_id(claimed) else None
        try:
            item, error = parse_item(d, line_no, defaults, path.parent), None
        except ItemError as e:
            item, error = None, str(e)
        if claimed in first:
            also = f"; also {error}" if error else ""
            msg = f"{where}: duplicate id {claimed!r} (first used on line {first[claimed]}){also}"
            failed.append(_failure(line_id, msg))
            continue
        if claimed is not None:
            first[claimed] = line_no
        if error is not None:
            failed.append(_failure(claimed or line_id, f"{where}: {error}"))
        else:
            items.append(item)
    return items, failed


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from an image file's header as displayed (EXIF orientation applied), nothing decoded;
    ItemError naming the file if it is missing, not an image or over MAX_IMAGE_PIXELS."""
    p = Path(path)
    if not p.is_file():
        raise ItemError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():  # PIL's decompression-bomb warning: the cap below is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = displayed_size(im)
    except Exception as e:  # PIL raises many types for corrupt or unknown formats (and DecompressionBombError)
        raise ItemError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise ItemError(
            f"image {path} is {w}x{h} ({w * h / 1e6:.0f} MP), over the {MAX_IMAGE_PIXELS / 1e6:.0f} MP an input "
            "may have: not decoded"
        )
    return w, h


def load_image(path: str) -> Image.Image:
    """Check the header (`image_size`), then fully decode the image as RGB, turned upright (EXIF orientation);
    ItemError naming the file otherwise."""
    image_size(path)
    try:
        with Image.open(path) as im:
            turn = orientation(im)  # (from the header, as image_size read it)
            im.load()
            return upright(im, turn).convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt or unknown formats
        raise ItemError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def file_digest(path: str) -> str:
    """sha256 hex of a file's bytes (read in chunks); ItemError naming the file if it cannot be read."""
    if not Path(path).is_file():
        raise ItemError(f"image not found: {path}")
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ItemError(f"cannot read image {path}: {e}") from None


def item_key(item: EditItem, model: str) -> str:
    """What produces an item's output, as 16 hex digits of sha256: its resolved fields, its image's bytes (and
    EXIF orientation, which is applied: results of versions that ignored it are not trusted) and `model` (the
    caller's identity of the model and its sampling options). ItemError if the image is unreadable."""
    image = [file_digest(x) for x in item.images] if len(item.images) > 1 else None
    image = image or (None if item.image is None else file_digest(item.image))  # one image: as it always was
    inputs = [item.prompt, item.seed, item.steps, item.guidance, item.width, item.height, image, model]
    turned = [_orientation(x) for x in item.images]
    inputs += [turned] if any(o != 1 for o in turned) else []  # (unturned images: keys as before)
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]


def _orientation(path: str) -> int:
    try:
        with Image.open(path) as im:
            return orientation(im)
    except Exception:  # noqa: BLE001 - unreadable: its item fails when its size is read
        return 1


def check_output_dir(out_dir: Path, flag: str = "--out") -> None:
    """ValueError in one line unless `out_dir` is a folder that can be written or created: checked before a model
    is loaded, so a file, a path under a file or an unwritable folder costs nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{flag} {out_dir} is a file, not a folder")
    parent = next((p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise ValueError(f"{flag} {out_dir}: cannot make a folder there ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out_dir}: cannot write in {parent} (permission denied)")


LOCK = ".jaxedit-batch.lock"  # in the output folder: held (flock) by the one job writing it, names that job


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir`'s lock file for the block: one job writes a folder at a time (two would overwrite each
    other's images and temporaries). OutputBusy naming the holder (pid, host, start) if another job holds it; a
    killed job's lock is free at once (`jaxedit.locks`). A killed job's temporaries are removed."""
    busy = f"{out_dir} is being written by another jaxedit batch"
    with locks.exclusive(out_dir / LOCK, busy, "wait for it to finish or give another --out", OutputBusy):
        for stale in out_dir.glob(".*.png.*.tmp"):  # (only the lock's holder writes here)
            stale.unlink(missing_ok=True)
        yield


def png_digest(path: Path) -> str | None:
    """sha256 hex of a file's bytes, None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def write_png(img: Image.Image, dst: Path) -> str:
    """Write `img` to `dst` as PNG atomically (a temporary of this process beside it, then renamed); returns the
    sha256 of the bytes written."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    write_file(dst, data)
    return hashlib.sha256(data).hexdigest()


def _failure(item_id: str, error: str, **extra) -> dict:
    return {"id": item_id, "status": "failed", "error": error, **extra}


def _record(raw: bytes) -> dict | None:
    """A results line's record, None if it is not one (not UTF-8, not JSON, no string id)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None


def _line_numbers(ns: list[int], most: int = 10) -> str:
    head = ", ".join(map(str, ns[:most])) + (", ..." if len(ns) > most else "")
    return f"line{'s' if len(ns) > 1 else ''} {head}"


class Results:
    """`DIR/results.jsonl`: one line per finished item (latest line per id wins). A last line torn by a killed
    writer (no newline, unreadable) is cut off when the file is opened, reported once; unreadable lines
    elsewhere are skipped with a warning. Their items run again."""

    def __init__(self, out_dir: Path, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        self.path = out_dir / "results.jsonl"
        self.latest: dict[str, dict] = {}
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        if tail.strip() and _record(tail) is None:  # only a killed writer leaves one: cut it off in place
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(tail))
            log(f"{self.path}: cut off a torn last line ({len(tail)} bytes, left by a killed run)")
        elif tail.strip():  # complete but for its newline
            with open(self.path, "ab") as f:
                f.write(b"\n")
            lines.append(tail)
        bad = []
        for n, raw in enumerate(lines, start=1):
            if raw.strip():
                rec = _record(raw)
                if rec is None:
                    bad.append(n)
                else:
                    self.latest[rec["id"]] = rec
        if bad:
            log(f"{self.path}: skipped {len(bad)} unreadable {_line_numbers(bad)}")

    def done(self, item_id: str, key: str, out_dir: Path) -> bool:
        """Whether the item's latest result is ok, was produced from the same inputs (`key`) and its PNG is the one
        written with it (the sha256 the record holds: not another job's image under the same name)."""
        rec = self.latest.get(item_id)
        if not (rec and rec.get("status") == "ok" and rec.get("key") == key and rec.get("sha256")):
            return False
        return png_digest(out_dir / f"{item_id}.png") == rec["sha256"]

    def write(self, rec: dict) -> None:
        self.latest[rec["id"]] = rec
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


class Progress:
    """Items done, per-item time and ETA on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()

    def update(self, n: int, failed: int = 0) -> None:
        self.done += n
        if not self.enabled or not self.total:
            return
        el = time.perf_counter() - self.t0
        per = el / max(self.done, 1)
        eta = per * (self.total - self.done)
        bar = "#" * int(30 * self.done / self.total)
        print(
            f"\r[{bar:<30}] {self.done}/{self.total} items, {per:.2f}s/item, ETA {eta:.0f}s"
            + (f", {failed} failed" if failed else ""),
            end="" if self.done < self.total else "\n",
            file=sys.stderr,
            flush=True,
        )


def run_job(
    pipeline: EditPipeline | None,
    manifest: Path,
    out_dir: Path,
    *,
    batch_size: int = 1,
    defaults: dict,
    model: str = "",
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    locked: bool = False,
) -> dict:
    """Run every item of `manifest`; returns counts {"ok", "failed", "skipped"}. model: an identity of the model
    and its sampling options (`jaxedit.cli.model_identity`), part of each result's key: change it, all rerun.
    The job holds `out_dir`'s lock (`output_lock`; OutputBusy if another job does) unless the caller holds it
    (locked=True). pipeline None: only when nothing is left to edit (`pending`), ValueError otherwise."""
    out_dir = Path(out_dir)
    if not locked:
        out_dir.mkdir(parents=True, exist_ok=True)
        with output_lock(out_dir):
            return _run_job(pipeline, manifest, out_dir, batch_size, defaults, model, progress, log)
    return _run_job(pipeline, manifest, out_dir, batch_size, defaults, model, progress, log)


def pending(manifest: Path, out_dir: Path, *, defaults: dict, model: str,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> int:  # fmt: skip
    """How many of `manifest`'s items `run_job` with these defaults and model would hand to the pipeline (not done
    with the same key, image readable): at 0 the job needs no pipeline (`run_job(None, ...)`)."""
    results = Results(Path(out_dir), log)
    items, _ = read_manifest(Path(manifest), defaults)
    n = 0
    for it in items:
        try:
            n += not results.done(it.id, item_key(it, model), Path(out_dir))
        except ItemError:
            continue
    return n


def _run_job(pipeline, manifest, out_dir, batch_size, defaults, model, progress, log) -> dict:
    results = Results(out_dir, log)
    items, failures = read_manifest(Path(manifest), defaults)
    for rec in failures:
        results.write(rec)
    counts = {"ok": 0, "failed": len(failures), "skipped": 0}
    bar = None

    def fail(it: EditItem, error: str) -> None:
        results.write(_failure(it.id, error, seed=it.seed))
        counts["failed"] += 1
        if bar is not None:
            bar.update(1, counts["failed"])

    todo = []
    for it in items:
        try:
            key = item_key(it, model)
        except ItemError as e:
            fail(it, str(e))
            continue
        if results.done(it.id, key, out_dir):
            counts["skipped"] += 1
        else:
            todo.append((it, key))
    if counts["skipped"]:
        log(f"skipping {counts['skipped']} item(s) already done in {results.path}")

    if todo and pipeline is None:
        raise ValueError(f"{len(todo)} item(s) to edit and no pipeline given")
    # bucket by the images' headers; decode only for the batch about to run
    bar = Progress(len(todo), progress)
    buckets: dict[Any, list[tuple[EditItem, str]]] = defaultdict(list)
    for it, key in todo:
        try:
            size = item_size(pipeline, it)
            buckets[(pipeline.bucket_for(size, it.width, it.height), it.steps)].append((it, key))
        except (ItemError, ValueError) as e:
            fail(it, str(e))

    for (bucket, steps), members in buckets.items():
        for batch in _chunks(_prepared(pipeline, bucket, members, fail), batch_size):
            t0 = time.perf_counter()
            its = [it for it, _, _ in batch]
            # pad a short last batch with copies of its last item: one compiled shape per bucket
            pad = batch + [batch[-1]] * (batch_size - len(batch))
            try:
                images = pipeline.edit(
                    [p for _, _, p in pad], [it.prompt for it, _, _ in pad], [it.seed for it, _, _ in pad],
                    [it.guidance for it, _, _ in pad], steps,
                )[: len(its)]  # fmt: skip
            except NonFiniteError as e:  # those items fail; the others' images are written
                images = e.images[: len(its)]
            except ValueError as e:  # the items' inputs (ItemError is one): they fail, the job goes on
                for it in its:
                    fail(it, f"generation failed: {type(e).__name__}: {e}")
                images = []
            except Exception as e:  # the program's fault (e.g. out of memory): stop, record nothing against items
                ids, first_line = ", ".join(it.id for it in its), (str(e).splitlines() or [""])[0]
                raise ProgramFault(
                    f"generation failed on item(s) {ids}: {type(e).__name__}: {first_line}"
                    f" (a fault of the program, not of the items; {counts['ok']} item(s) done this run are kept, "
                    "rerun to continue)"
                ) from e
            per_item = (time.perf_counter() - t0) / len(its)
            for (it, key, _), img in zip(batch, images):
                if img is None:
                    fail(it, "the result came out with NaN or inf values (a LoRA, the model's weights or a setting "
                         "overflowed): no PNG written")  # fmt: skip
                    continue
                dst = out_dir / f"{it.id}.png"
                digest = write_png(img, dst)
                results.write({
                    "id": it.id, "status": "ok", "output": str(dst), "key": key, "sha256": digest, "seed": it.seed,
                    "steps": steps,
                    "guidance": it.guidance, "width": img.width, "height": img.height,
                    "seconds": round(per_item, 3), "error": None,
                })  # fmt: skip
                counts["ok"] += 1
            if any(img is not None for img in images):  # (failed items counted themselves)
                bar.update(sum(img is not None for img in images), counts["failed"])
            del batch, pad, images  # the next batch is decoded without this one's arrays
    return counts


def _prepared(
    pipeline: EditPipeline, bucket: Any, members: list[tuple[EditItem, str]], fail: Callable[[EditItem, str], None]
) -> Iterator[tuple[EditItem, str, Any]]:
    """(item, key, prepared) of `members`, each decoded and prepared only when asked for; a failing item is
    recorded and left out."""
    for it, key in members:
        try:
            image = [load_image(x) for x in it.images] if len(it.images) > 1 else None
            image = image or (load_image(it.image) if it.image is not None else None)
            prepared = pipeline.prepare(image, it.width, it.height)
        except (ItemError, ValueError) as e:
            fail(it, str(e))
            continue
        if prepared.bucket != bucket:
            raise ProgramFault(
                f"item {it.id}: {type(pipeline).__name__}.prepare gave bucket {prepared.bucket}, its bucket_for "
                f"{bucket} (a fault of the pipeline)"
            )
        yield it, key, prepared


def item_size(pipeline: EditPipeline, item: EditItem):
    """What `pipeline.bucket_for` takes for the item's images: (w, h), a list of them (several images) or None;
    ItemError naming the file or field if an image is unreadable or the pipeline takes one image only."""
    if len(item.images) > 1:
        if not getattr(pipeline, "several_references", False):
            raise ItemError(f"field 'images': this model takes one input image, got {len(item.images)}")
        return [image_size(x) for x in item.images]
    return image_size(item.image) if item.image is not None else None


def _chunks(seq: Iterable, n: int) -> Iterator[list]:
    it = iter(seq)
    while chunk := list(islice(it, n)):
        yield chunk
