"""Tables of judged edits in each benchmark's aggregation, and the HTML report.

- GEdit-Bench (GEdit-Bench/calculate_statistics.py): per language, per task_type the means of SC, PQ and
  O = sqrt(SC * PQ) over its items; the average row is the mean of the task types' means; the same over the
  Intersection_exist subset.
- ImgEdit Basic (Benchmark/Basic/step2_typescore.py): per edit_type the mean of the items' scores (each the mean of
  its answer's scores, rounded to 2 places), rounded to 2 places; overall (not in their scripts): the mean of the
  edit types' means.
- pairs: per category and over all items, the mean of each numeric score (booleans as a rate, in %).

Items not judged (their answer unparsed, or the edit failed) are left out and counted in each table's
`unparsed` / `failed` columns.

Metrics (`jaxedit.evaluation.run.metrics_of`: l1, clip_image, clip_text), when any item has them: one more table,
per category (per language and category on GEdit-Bench) and over all items, the mean of each metric over the
edited items that have it (judged or not: the metrics need no judge), `n` the items with any metric.
"""

from __future__ import annotations

import html
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from jaxedit.staged import write_file


def mean(xs) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def counts(records: list[dict], key) -> dict:
    out = defaultdict(lambda: {"unparsed": 0, "failed": 0})
    for r in records:
        if r["status"] in ("unparsed", "failed"):
            out[key(r)][r["status"]] += 1
    return out


def gedit_tables(records: list[dict]) -> list[dict]:
    tables = []
    for lang in sorted({r.get("language") or "" for r in records}):
        mine = [r for r in records if (r.get("language") or "") == lang]
        bad = counts(mine, lambda r: r["category"])
        for subset in ("full", "intersection"):
            judged = [r for r in mine if r["status"] == "judged" and (subset == "full" or r.get("intersection"))]
            cats = sorted({r["category"] for r in mine})
            rows, means = [], []
            for c in cats:
                g = [r["scores"] for r in judged if r["category"] == c]  # O of each item from its SC and PQ
                m = [
                    mean([s["SC"] for s in g]),
                    mean([s["PQ"] for s in g]),
                    mean([(s["SC"] * s["PQ"]) ** 0.5 for s in g]),
                ]
                rows.append([c, len(g), *m, bad[c]["unparsed"], bad[c]["failed"]])
                if g:
                    means.append(m)
            avg = [mean([m[i] for m in means]) for i in range(3)]
            total = [sum(bad[c][k] for c in cats) for k in ("unparsed", "failed")]
            rows.append(["average", len(judged), *avg, *total])
            columns = ["task_type", "n", "SC", "PQ", "O", "unparsed", "failed"]
            title = f"GEdit-Bench {lang} ({subset} set)"
            tables.append({"title": title, "language": lang, "subset": subset, "columns": columns, "rows": rows})
    return tables


def imgedit_tables(records: list[dict]) -> list[dict]:
    bad = counts(records, lambda r: r["category"])
    judged = [r for r in records if r["status"] == "judged"]
    rows, means = [], []
    for c in sorted({r["category"] for r in records}):
        g = [r["scores"]["score"] for r in judged if r["category"] == c]
        m = round(sum(g) / len(g), 2) if g else None
        rows.append([c, len(g), m, bad[c]["unparsed"], bad[c]["failed"]])
        means += [m] if g else []
    total = [sum(v[k] for v in bad.values()) for k in ("unparsed", "failed")]
    rows.append(["overall (mean of types)", len(judged), mean(means), *total])
    return [{"title": "ImgEdit Basic", "columns": ["edit_type", "n", "score", "unparsed", "failed"], "rows": rows}]


def pairs_tables(records: list[dict]) -> list[dict]:
    judged = [r for r in records if r["status"] == "judged"]
    names = sorted({k for r in judged for k in r["scores"]})
    bools = {k for k in names if all(isinstance(r["scores"].get(k, False), bool) for r in judged)}
    bad = counts(records, lambda r: r["category"])
    rows = []
    for c in [*sorted({r["category"] for r in records}), "all"]:
        g = [r["scores"] for r in judged if c in ("all", r["category"])]
        vals = [mean([float(s[k]) for s in g if k in s]) for k in names]
        vals = [None if v is None else 100 * v if k in bools else v for k, v in zip(names, vals)]
        b = {k: sum(v[k] for v in bad.values()) for k in ("unparsed", "failed")} if c == "all" else bad[c]
        rows.append([c, len(g), *vals, b["unparsed"], b["failed"]])
    columns = ["category", "n", *[f"{k} %" if k in bools else k for k in names], "unparsed", "failed"]
    return [{"title": "pairs", "columns": columns, "rows": rows}]


TABLES = {"gedit": gedit_tables, "imgedit": imgedit_tables, "pairs": pairs_tables}
METRICS = ("l1", "clip_image", "clip_text")


def metrics_table(records: list[dict]) -> list[dict]:
    """The metrics' means per category and over all items (no table when no item has a metric)."""
    have = [r for r in records if r.get("metrics")]
    names = [k for k in METRICS if any(k in r["metrics"] for r in have)]
    if not names:
        return []
    label = lambda r: f"{r['language']} {r['category']}" if r.get("language") else r["category"]  # noqa: E731
    rows = []
    for c in [*sorted({label(r) for r in have}), "all"]:
        g = [r["metrics"] for r in have if c in ("all", label(r))]
        rows.append([c, len(g), *[mean([m[k] for m in g if k in m]) for k in names]])
    return [{"title": "metrics (mean per item)", "columns": ["category", "n", *names], "rows": rows}]


def cell(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(tables: list[dict]) -> str:
    out = []
    for t in tables:
        out += [f"### {t['title']}", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
        out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in t["rows"]]
        out.append("")
    return "\n".join(out)


def write_tables(out: Path, kind: str, records: list[dict]) -> list[dict]:
    """OUT/summary.json and OUT/summary.md of `records`; returns the tables."""
    tables = TABLES[kind](records) + metrics_table(records)
    write_file(out / "summary.json", json.dumps({"benchmark": kind, "tables": tables}, indent=1) + "\n")
    write_file(out / "summary.md", markdown(tables) + "\n")
    return tables


def html_report(out: Path, records: list[dict], tables: list[dict]) -> Path:
    """OUT/report.html: the tables, then one row per item (source, edit, target as relative links; instruction,
    status, scores)."""
    rel = lambda p: html.escape(os.path.relpath(p, out)) if p else None  # noqa: E731
    img = lambda p: f'<a href="{rel(p)}"><img src="{rel(p)}" width="128"></a>' if p else ""  # noqa: E731
    parts = ["<!doctype html><meta charset='utf-8'><title>jaxedit eval</title>",
             "<style>td,th{border:1px solid #ccc;padding:4px;vertical-align:top}table{border-collapse:collapse}"
             "</style>"]  # fmt: skip
    for t in tables:
        parts.append(f"<h3>{html.escape(t['title'])}</h3><table><tr>")
        parts += [f"<th>{html.escape(c)}</th>" for c in t["columns"]] + ["</tr>"]
        for row in t["rows"]:
            parts.append("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts.append("<h3>Items</h3><table><tr><th>id</th><th>category</th><th>instruction</th><th>source</th>"
                 "<th>edit</th><th>target</th><th>scores</th></tr>")  # fmt: skip
    for r in records:
        scores = r.get("scores") or {"status": r["status"], "error": r.get("error")}
        extra = {k: r[k] for k in ("metrics",) if r.get(k)}
        parts.append(
            f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['category'])}</td>"
            f"<td>{html.escape(r['instruction'])}</td><td>{img(r['source'])}</td><td>{img(r.get('edit'))}</td>"
            f"<td>{img(r.get('target'))}</td><td><pre>{html.escape(json.dumps({**scores, **extra}, indent=1))}</pre>"
            "</td></tr>"
        )
    parts.append("</table>")
    return write_file(out / "report.html", "\n".join(parts) + "\n")
