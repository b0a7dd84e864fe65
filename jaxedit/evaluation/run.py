"""`jaxedit eval`'s job: edit every item of a benchmark (the batch machinery: `jaxedit.pipelines.batch.run_job`,
resumable, a bad item fails alone), judge each edit (resumable: OUT/judged.jsonl, one line per judged item, the
latest per id wins and is kept while the edit and the judge are the same), write the tables and the report.

    OUT/edits.jsonl        the batch manifest made from the benchmark (image, prompt, id, seed)
    OUT/editor.json        the editing model's identity and sampling defaults, under the options that made them
                           (a rerun with the same options and nothing left to edit loads no editing model)
    OUT/edits/<id>.png     the edits, OUT/edits/results.jsonl their batch results
    OUT/judged.jsonl       per item: status (judged / unparsed / failed), scores, the judge's raw answers, metrics
                           (L1 to the target; with a CLIP scorer CLIP-I and CLIP-T: `metrics_of`)
    OUT/results.jsonl      per item, in the benchmark's order: the item, its edit and its judgement
    OUT/summary.md, OUT/summary.json, OUT/report.html
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxedit.evaluation import judges as J
from jaxedit.evaluation import report
from jaxedit.evaluation.benchmarks import Benchmark, Item
from jaxedit.staged import write_file


def manifest(bench: Benchmark, items: list[Item], out: Path, seed: int) -> Path:
    """OUT/edits.jsonl: one batch line per item (its seed, else `seed` + its index)."""
    lines = []
    for i, it in enumerate(items):
        rec = {"id": it.id, "image": str(Path(it.source).absolute()), "prompt": it.instruction}
        lines.append(json.dumps(rec | {"seed": it.seed if it.seed is not None else seed + i}))
    return write_file(out / "edits.jsonl", "\n".join(lines) + "\n")


def latest(path: Path) -> dict[str, dict]:
    """The latest record per id of a JSONL file (unreadable lines skipped: their items run again)."""
    out = {}
    if path.is_file():
        for line in path.read_bytes().split(b"\n"):
            try:
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                out[rec["id"]] = rec
    return out


def append(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def rgb(path: str | None) -> np.ndarray | None:
    """uint8 [H, W, 3] of an image file."""
    from jaxedit.pipelines.batch import load_image

    return None if path is None else np.asarray(load_image(path))


def judge_items(bench: Benchmark, todo: list[tuple[Item, dict, str]], judge, write: Callable[[dict], None],
                clip=None, chunk: int = 1) -> None:  # fmt: skip
    """Judge (item, edit result, key) triples `chunk` items at a time (a judge folder: its own batch); each judged
    record goes to `write` as soon as its chunk is done, with its metrics (`metrics_of`, batched per chunk)."""
    from PIL import Image

    chunk = getattr(judge, "batch_size", None) or chunk
    for lo in range(0, len(todo), chunk):
        part = todo[lo : lo + chunk]
        edits = [rgb(res["output"]) for _, res, _ in part]
        sources = [rgb(it.source) for it, _, _ in part]
        targets = [rgb(it.target) for it, _, _ in part]
        answers: list[dict[str, str]] = [{} for _ in part]
        if isinstance(judge, J.QwenJudge):
            asks = []
            for i, (it, _, _) in enumerate(part):
                src = Image.fromarray(sources[i])
                edit = Image.fromarray(edits[i])
                if bench.kind == "gedit":  # the edit at the source's size (test_gedit_score.py)
                    edit = edit.resize(src.size)
                prompts = {"prompt": bench.prompts.get(it.category, "")} | bench.prompts
                asks += [(i, name, (text, imgs, first)) for name, text, imgs, first in
                         J.queries(bench.kind, prompts, it.instruction, src, edit)]  # fmt: skip
            texts = judge.ask([a for _, _, a in asks])
            for (i, name, _), text in zip(asks, texts):
                answers[i][name] = text
        metrics = metrics_of(clip, edits, targets, [it.instruction for it, _, _ in part])
        for i, (it, _, key) in enumerate(part):
            rec = {"id": it.id, "key": key}
            try:
                if isinstance(judge, J.QwenJudge):
                    rec["answers"] = answers[i]
                    scores = J.RECORDS[bench.kind](answers[i])
                else:
                    scores = judge.score(edits[i], kind=bench.kind, source=sources[i], target=targets[i],
                                         instruction=it.instruction, category=it.category)  # fmt: skip
                rec |= {"status": "judged", "scores": scores}
            except J.Unparsed as e:
                rec |= {"status": "unparsed", "error": str(e)}
            if metrics[i]:
                rec["metrics"] = metrics[i]
            write(rec)


def metrics_of(clip, edits: list[np.ndarray], targets: list[np.ndarray | None],
               instructions: list[str]) -> list[dict[str, float]]:  # fmt: skip
    """Per edit: `l1` to its target (when it has one: no model needed), and with a CLIP scorer
    (`jaxedit.evaluation.metrics.ClipScorer`) `clip_image`, CLIP-I to the target, and `clip_text`, CLIP-T to the
    instruction; each batched over the edits."""
    from jaxedit.evaluation import metrics

    out: list[dict[str, float]] = [{} for _ in edits]
    have = [i for i, t in enumerate(targets) if t is not None]
    for i in have:
        out[i]["l1"] = metrics.l1(targets[i], edits[i])
    if clip is not None:
        for i, v in enumerate(clip.text_similarity(edits, instructions)):
            out[i]["clip_text"] = float(v)
        if have:
            sims = clip.image_similarity([edits[i] for i in have], [targets[i] for i in have])
            for i, v in zip(have, sims):
                out[i]["clip_image"] = float(v)
    return out


EDITOR = "editor.json"
Log = Callable[[str], None]


def stderr(line: str) -> None:
    print(line, file=sys.stderr)


class LoadFailed(RuntimeError):
    """The judge or the CLIP model could not be read when judging began (one line, naming it)."""


def evaluate(pipe, bench: Benchmark, judge, out: Path, *, batch_size: int, defaults: dict, model: str, seed: int,
             clip=None, clip_id: str | None = None, judge_batch: int | None = None, progress: bool = True,
             log: Log = stderr) -> dict[str, Any]:  # fmt: skip
    """`edit_all` with a loaded pipeline, then `judge_all`: edit, judge, tabulate `bench.items` into `out` (whose
    lock the caller holds); returns counts and the tables."""
    counts = edit_all(lambda: (pipe, defaults, model), bench, out, batch_size=batch_size, seed=seed,
                      progress=progress, log=log)  # fmt: skip
    return judge_all(judge, bench, out, counts, batch_size=batch_size, clip=clip, clip_id=clip_id,
                     judge_batch=judge_batch, log=log)  # fmt: skip


def edit_all(open_pipe: Callable[[], tuple[Any, dict, str]], bench: Benchmark, out: Path, *, batch_size: int,
             seed: int, options: str | None = None, progress: bool = True, log: Log = stderr) -> dict:  # fmt: skip
    """Edit every item of `bench` not yet edited (`jaxedit.pipelines.batch.run_job`, resumable) into OUT/edits;
    returns its counts. open_pipe() -> (pipeline, sampling defaults, model identity) is called only when an item
    is left to edit: with `options` (the editing options as given, `jaxedit.cli.editor_options`) the identity and
    defaults are recorded in OUT/editor.json, and a rerun with the same options whose items are all edited under
    them loads nothing. The pipeline is released before this returns (`release`: no reference to its arrays
    kept), so the judge that follows has the device memory."""
    from jaxedit.pipelines.batch import pending, run_job

    path = manifest(bench, bench.items, out, seed)
    (out / "edits").mkdir(exist_ok=True)
    known = recorded(out, options)
    if known is not None and not pending(path, out / "edits", defaults=known[0], model=known[1], log=log):
        log("editing: every item is edited already; the editing model is not loaded")
        return run_job(None, path, out / "edits", batch_size=batch_size, defaults=known[0], model=known[1],
                       progress=False, log=log, locked=True)  # fmt: skip
    pipe, defaults, model = open_pipe()
    if options is not None:
        write_file(out / EDITOR, json.dumps({"options": options, "defaults": defaults, "model": model}) + "\n")
    try:
        return run_job(pipe, path, out / "edits", batch_size=batch_size, defaults=defaults, model=model,
                       progress=progress, log=log, locked=True)  # fmt: skip
    finally:
        del pipe
        release()


def recorded(out: Path, options: str | None) -> tuple[dict, str] | None:
    """(defaults, model identity) OUT/editor.json holds for these options; None if it holds none for them."""
    try:
        rec = json.loads((out / EDITOR).read_text())
        if options is not None and rec["options"] == options:
            return dict(rec["defaults"]), str(rec["model"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def release() -> None:
    """Free the device memory of models whose references were dropped: collect cycles that hold them and drop
    JAX's compiled-program caches (a program traced with a model's arrays as constants keeps them alive)."""
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()


def judge_all(judge, bench: Benchmark, out: Path, edit_counts: dict, *, batch_size: int, clip=None,
              clip_id: str | None = None, judge_batch: int | None = None,
              log: Log = stderr) -> dict[str, Any]:  # fmt: skip
    """Judge every edited item not yet judged with the same inputs (OUT/judged.jsonl), write the tables and the
    report; returns counts and the tables. judge: a `judges.QwenJudge` (its weights read here, only when an item
    is left to judge) or a `judges.PythonJudge`; clip: a `jaxedit.evaluation.metrics.ClipScorer` or a CLIP folder
    (loaded likewise) for CLIP-I and CLIP-T besides L1, clip_id its identity (a rerun with another CLIP model
    scores again); judge_batch: items judged per step (a judge folder: its own batch; default `batch_size`).
    LoadFailed if the judge's or CLIP's weights cannot be read."""
    items = bench.items
    edits = latest(out / "edits" / "results.jsonl")
    judged_path = out / "judged.jsonl"
    judged = latest(judged_path)
    metrics_id = {"l1": 1, "clip": clip_id}  # (records made before L1 without CLIP existed are made again)
    ident = json.dumps([judge.identity(), bench.kind, bench.prompts, metrics_id], sort_keys=True)
    todo, skipped = [], 0
    for it in items:
        res = edits.get(it.id)
        if not res or res.get("status") != "ok":
            continue
        key = hashlib.sha256(json.dumps([res["sha256"], ident, it.instruction, it.category, it.target and
                                         target_digest(it.target)]).encode()).hexdigest()[:16]  # fmt: skip
        if judged.get(it.id, {}).get("key") == key:
            skipped += 1
        else:
            todo.append((it, res, key))
    if skipped:
        log(f"judging: {skipped} item(s) already judged in {judged_path}")

    if todo:
        chunk = judge_batch or batch_size
        try:
            if isinstance(judge, J.QwenJudge):
                judge.load()
        except (FileNotFoundError, ValueError) as e:
            raise LoadFailed(f"--judge {judge.folder}: {e}") from None
        if isinstance(clip, str | Path):
            from jaxedit.evaluation.metrics import ClipScorer

            try:
                clip = ClipScorer.load(clip, batch_size=chunk)
            except (FileNotFoundError, ValueError) as e:
                raise LoadFailed(f"--clip {clip}: {e}") from None

    def write(rec):
        judged[rec["id"]] = rec
        append(judged_path, rec)

    judge_items(bench, todo, judge, write, clip, judge_batch or batch_size)
    records = []
    for it in items:
        res, j = edits.get(it.id) or {}, judged.get(it.id) or {}
        rec = {"id": it.id, "category": it.category, "instruction": it.instruction, "language": it.language,
               "intersection": it.intersection, "source": it.source, "target": it.target}  # fmt: skip
        if res.get("status") != "ok":
            rec |= {"status": "failed", "error": res.get("error", "not edited")}
        else:
            rec |= {"edit": res["output"], "seed": res.get("seed")}
            rec |= {k: j[k] for k in ("status", "scores", "answers", "error", "metrics") if k in j}
        records.append(rec)
    write_file(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    tables = report.write_tables(out, bench.kind, records)
    report.html_report(out, records, tables)
    status = [r["status"] for r in records]
    return {"edits": edit_counts, "judged": status.count("judged"), "unparsed": status.count("unparsed"),
            "failed": status.count("failed"), "tables": tables}  # fmt: skip


def target_digest(path: str) -> str:
    from jaxedit.pipelines.batch import file_digest

    return file_digest(path)
