"""`python -m shapes`: write a split of the shapes task, or print its vocabulary.

    python -m shapes write OUT --split train --count 20000 [--size 64] [--edit-weights remove=2,move=2]
    python -m shapes benchmark --out DIR --count 240 [--split test]   (`jaxedit eval --judge shapes:score_edit`)
    python -m shapes vocabulary > vocabulary.txt   (every instruction: tokenizer training text)

`--edit-weights` writes a training file with more of some edits: a weighted choice of indices
(`select_indices`); every pair is still `sample(split, i)`.
"""

from __future__ import annotations

import argparse
import json
import time

from shapes.dataset import parse_edit_weights, write_benchmark, write_split
from shapes.task import EDIT_TYPES, SPLITS, vocabulary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shapes", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a split as PNG pairs + manifest.jsonl")
    w.add_argument("out")
    w.add_argument("--split", default="train", choices=list(SPLITS))
    w.add_argument("--count", type=int, default=20_000)
    w.add_argument("--size", type=int, default=64)
    w.add_argument("--start", type=int, default=0)
    w.add_argument("--processes", type=int, default=1)
    w.add_argument(
        "--edit-weights",
        default="",
        help="relative frequency of edit types, e.g. remove=2,move=2 (unlisted: 1); default uniform",
    )
    b = sub.add_parser("benchmark", help="a split as a `jaxedit eval` pairs benchmark (seeds = indices)")
    b.add_argument("--out", required=True)
    b.add_argument("--split", default="test", choices=list(SPLITS))
    b.add_argument("--count", type=int, default=240)
    b.add_argument("--size", type=int, default=64)
    sub.add_parser("vocabulary", help="print every instruction the task can produce, one a line")
    a = p.parse_args(argv)
    if a.cmd == "benchmark":
        path = write_benchmark(a.out, a.split, a.count, a.size)
        print(f"wrote {a.count} {a.split} edits to {path}: jaxedit eval --benchmark {a.out} --judge shapes:score_edit")
        return 0
    if a.cmd == "vocabulary":
        print("\n".join(vocabulary()))
        return 0
    try:
        weights = parse_edit_weights(a.edit_weights)
    except ValueError as e:
        p.error(f"--edit-weights: {e}")
    t0 = time.perf_counter()
    manifest = write_split(a.out, a.split, a.count, a.size, a.start, a.processes, weights)
    dt = time.perf_counter() - t0
    edits = [json.loads(line)["edit"] for line in manifest.read_text().splitlines()]
    mix = ", ".join(f"{e} {edits.count(e)}" for e in EDIT_TYPES)
    print(
        f"wrote {a.count} {a.split} pairs (from index {a.start}, {a.size}x{a.size} px; {mix}) "
        f"to {manifest.parent} in {dt:.1f} s ({a.count / dt:.0f}/s); manifest {manifest}"
    )
    return 0
