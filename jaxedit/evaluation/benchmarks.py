"""Benchmark copies on disk, read into one list of `Item`s (nothing is fetched): three layouts.

- GEdit-Bench (stepfun-ai/GEdit-Bench on the Hub; evaluation in stepfun-ai/Step1X-Edit GEdit-Bench/): Parquet
  files anywhere under DIR whose rows have the fields `key`, `task_type`, `instruction`, `instruction_language`
  (en / cn), `input_image` (a Hub Image: a struct with `bytes`, or raw bytes) and `Intersection_exist`, as
  GEdit-Bench/generate_image_example.py and test_gedit_score.py read them. The judge prompts are read from
  DIR/viescore/vie_prompts.py (the copy of GEdit-Bench/viescore/, parsed with `ast`, never run): SC =
  _context_no_delimit + _prompts_0shot_two_image_edit_rule + _prompts_0shot_tie_rule_SC joined by newlines with
  `<instruction>` replaced (viescore/__init__.py, task "tie"), PQ = _context_no_delimit + _prompts_0shot_rule_PQ.
- ImgEdit-Bench Basic (PKU-YuanGroup/ImgEdit Benchmark/Basic/): DIR/basic_edit.json ({key: {"id": image path
  under the originals, "prompt", "edit_type"}}), the originals under DIR/singleturn/ (basic_bench.py's
  --origin_img_root; or DIR/images/, DIR/original_images/) and the judge prompts DIR/prompts.json ({edit_type:
  prompt with `<edit_prompt>`}, basic_bench.py's --prompts_json).
- pairs (jaxedit's own): DIR/benchmark.jsonl, one {"id", "category", "instruction", "source", optional "target",
  optional "seed"} a line, paths relative to DIR.

A missing file or a bad field raises `BenchmarkError` naming the file, line or key and the field.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

from jaxedit import jsonl


class BenchmarkError(ValueError):
    """A benchmark copy that cannot be read: the message names the file (and key or line) and field."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One edit: `source` (and `target`) image paths; `language` (GEdit) and `subset` flags (GEdit's
    Intersection_exist) where the benchmark has them."""

    id: str
    category: str
    instruction: str
    source: str
    target: str | None = None
    language: str | None = None
    intersection: bool | None = None
    seed: int | None = None


@dataclasses.dataclass
class Benchmark:
    """A benchmark copy: its layout ("gedit", "imgedit", "pairs"), items and the judge prompts it ships."""

    kind: str
    root: Path
    items: list[Item]
    prompts: dict[str, str]


SAFE = re.compile(r"[^A-Za-z0-9._-]")
GEDIT_FIELDS = ("key", "task_type", "instruction", "instruction_language", "input_image", "Intersection_exist")
VIE_NAMES = ("_context_no_delimit", "_prompts_0shot_two_image_edit_rule", "_prompts_0shot_tie_rule_SC",
             "_prompts_0shot_rule_PQ")  # fmt: skip
IMGEDIT_ORIGINALS = ("singleturn", "images", "original_images")


def detect(root: Path) -> str:
    """The layout of the copy at `root`; BenchmarkError naming what was looked for."""
    if (root / "benchmark.jsonl").is_file():
        return "pairs"
    if (root / "basic_edit.json").is_file():
        return "imgedit"
    if any(root.rglob("*.parquet")):
        return "gedit"
    raise BenchmarkError(f"--benchmark {root}: no benchmark.jsonl (pairs), basic_edit.json (ImgEdit Basic) or "
                         "*.parquet (GEdit-Bench) in it")  # fmt: skip


def read(root: str | Path, inputs: Path) -> Benchmark:
    """The benchmark at `root`; images held inside files (GEdit's Parquet) are written under `inputs`."""
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"--benchmark {root}: not a folder")
    kind = detect(root)
    return {"pairs": read_pairs, "imgedit": read_imgedit, "gedit": read_gedit}[kind](root, inputs)


def field(d: Any, name: str, where: str, kind: type = str) -> Any:
    if not isinstance(d, dict) or name not in d:
        raise BenchmarkError(f"{where}: field {name!r} is missing")
    value = d[name]
    if kind is str:
        try:
            return jsonl.check_text(value, name)
        except ValueError as e:
            raise BenchmarkError(f"{where}: {e}") from None
    if not isinstance(value, kind):
        raise BenchmarkError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def image_path(root: Path, rel: str, where: str, name: str) -> str:
    path = root / rel
    if not path.is_file():
        raise BenchmarkError(f"{where}: field {name!r}: image not found: {path}")
    return str(path)


def unique(items: list[Item], where: str) -> list[Item]:
    seen = set()
    for it in items:
        if it.id in seen:
            raise BenchmarkError(f"{where}: id {it.id!r} is used twice")
        seen.add(it.id)
    return items


def read_pairs(root: Path, inputs: Path) -> Benchmark:
    path = root / "benchmark.jsonl"
    items = []
    for n, d, bad in jsonl.read_lines(path):
        where = f"{path}:{n}"
        if bad is not None:
            raise BenchmarkError(f"{where}: {bad}")
        item_id = field(d, "id", where)
        if SAFE.search(item_id) or ".." in item_id:
            raise BenchmarkError(f"{where}: field 'id' {item_id!r} is not a safe file name")
        target, seed = d.get("target"), d.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
            raise BenchmarkError(f"{where}: field 'seed' must be an integer in [0, 2**31), got {seed!r}")
        if target is not None and not isinstance(target, str):
            raise BenchmarkError(f"{where}: field 'target' must be a path, got {target!r}")
        items.append(Item(
            id=item_id, category=field(d, "category", where), instruction=field(d, "instruction", where),
            source=image_path(root, field(d, "source", where), where, "source"),
            target=None if target is None else image_path(root, target, where, "target"), seed=seed,
        ))  # fmt: skip
    return Benchmark("pairs", root, unique(items, str(path)), {})


def read_imgedit(root: Path, inputs: Path) -> Benchmark:
    path = root / "basic_edit.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{path}: not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BenchmarkError(f"{path}: expected an object {{key: {{id, prompt, edit_type}}}}")
    originals = next((root / d for d in IMGEDIT_ORIGINALS if (root / d).is_dir()), None)
    if originals is None:
        raise BenchmarkError(f"{root}: no folder of original images ({', '.join(IMGEDIT_ORIGINALS)})")
    items = []
    for key, d in meta.items():
        where = f"{path} key {key!r}"
        items.append(Item(
            id=SAFE.sub("_", key), category=field(d, "edit_type", where), instruction=field(d, "prompt", where),
            source=image_path(originals, field(d, "id", where), where, "id"),
        ))  # fmt: skip
    prompts_path = root / "prompts.json"
    if not prompts_path.is_file():
        raise BenchmarkError(f"judge prompts not found: {prompts_path} (ImgEdit's --prompts_json: "
                             "{edit_type: prompt with <edit_prompt>})")  # fmt: skip
    try:
        prompts = json.loads(prompts_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{prompts_path}: not JSON ({e})") from None
    missing = sorted({it.category for it in items} - set(prompts if isinstance(prompts, dict) else ()))
    if missing:
        raise BenchmarkError(f"{prompts_path}: no prompt for edit_type {', '.join(map(repr, missing))}")
    return Benchmark("imgedit", root, unique(items, str(path)), prompts)


def vie_prompts(root: Path) -> dict[str, str]:
    """VIEScore's SC and PQ prompts of GEdit's viescore/vie_prompts.py copy (string assignments read with
    `ast`; the file is never run)."""
    path = next(iter(sorted(root.rglob("vie_prompts.py"))), None)
    if path is None:
        raise BenchmarkError(f"judge prompts not found: {root}/viescore/vie_prompts.py (GEdit-Bench's viescore "
                             f"copy, holding {', '.join(VIE_NAMES)})")  # fmt: skip
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"{path}: not Python ({e})") from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found[node.targets[0].id] = node.value.value
    missing = [n for n in VIE_NAMES if n not in found]
    if missing:
        raise BenchmarkError(f"{path}: no string {', '.join(missing)}")
    context = found["_context_no_delimit"]
    sc = "\n".join([context, found["_prompts_0shot_two_image_edit_rule"], found["_prompts_0shot_tie_rule_SC"]])
    return {"SC": sc, "PQ": "\n".join([context, found["_prompts_0shot_rule_PQ"]])}


def image_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes) or not value:
        raise BenchmarkError(f"{where}: field 'input_image' holds no image bytes")
    return value


def read_gedit(root: Path, inputs: Path) -> Benchmark:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BenchmarkError("reading GEdit-Bench's Parquet files needs pyarrow (pip install pyarrow)") from None
    from PIL import Image

    from jaxedit.staged import write_file

    prompts = vie_prompts(root)
    items = []
    for path in sorted(root.rglob("*.parquet")):
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise BenchmarkError(f"{path}: not Parquet ({type(e).__name__}: {e})") from None
        missing = [f for f in GEDIT_FIELDS if f not in table.column_names]
        if missing:
            raise BenchmarkError(f"{path}: no column {', '.join(map(repr, missing))}")
        for n, row in enumerate(table.select(list(GEDIT_FIELDS)).to_pylist()):
            where = f"{path} row {n}"
            key, lang = str(field(row, "key", where)), field(row, "instruction_language", where)
            item_id = SAFE.sub("_", f"{lang}_{key}")
            data = image_bytes(row["input_image"], where)
            try:
                fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
            except Exception as e:  # noqa: BLE001 - PIL raises many types
                raise BenchmarkError(f"{where}: field 'input_image' is not an image ({e})") from None
            src = inputs / f"{item_id}.{'jpg' if fmt == 'jpeg' else fmt}"
            if not (src.is_file() and src.read_bytes() == data):
                inputs.mkdir(parents=True, exist_ok=True)
                write_file(src, data)
            items.append(Item(
                id=item_id, category=field(row, "task_type", where), instruction=field(row, "instruction", where),
                source=str(src), language=lang, intersection=bool(row["Intersection_exist"]),
            ))  # fmt: skip
    return Benchmark("gedit", root, unique(items, str(root)), prompts)
