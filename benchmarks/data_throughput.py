"""Training data throughput per host: read + decode + bucket of 1024-px pairs, from record shards, from the
encoder cache's shards and from the folder reader, interleaved in rounds in one run (the machine may be shared:
ratios of the same round are what to compare), with 1, 2 and 4 reader threads; the reader's planning memory and
time for a 1M-example index; and what the train steps of docs/scaling.md consume per host.

    python benchmarks/data_throughput.py [--examples 32] [--rounds 3] [--threads 1 2 4] [--index 1000000]

The pairs are synthetic JPEGs (1024x1024 and 1184x880: two buckets), packed with `jaxedit data pack`'s code; the
cache's records hold arrays of FLUX.1 Kontext [dev]'s shapes (latents [128, 128, 16] of target and source, T5
[512, 4096] and CLIP [768], float32, as `jaxedit precompute` writes them), written by `jaxedit.data.encode` with
random arrays in place of the encoders. A host batch is 4 examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT  # benchmarks/common.py (puts the repo root on sys.path)

CHIPS_PER_HOST = 4  # TPU v5e / v5p / v6e multi-host slices: 4 chips a host (v5p-8: one host)


def write_pairs(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        w, h = (1024, 1024) if i % 2 == 0 else (1184, 880)
        small = rng.integers(0, 256, (h // 16, w // 16, 3), np.uint8)  # smooth content plus noise, like photos
        a = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.int16)
        a = np.clip(a + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
        for name, x in (("src", a), ("tgt", 255 - a)):
            Image.fromarray(x).save(root / "img" / f"{i}_{name}.jpg", quality=90)
        lines.append({"source": f"img/{i}_src.jpg", "target": f"img/{i}_tgt.jpg", "instruction": f"edit {i}"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def fake_cache(out: Path, cfg) -> None:
    import numpy as np

    from jaxedit.data import encode

    rng = np.random.default_rng(0)

    def enc(host: dict) -> dict:
        b, h, w, _ = host["target"].shape
        lat = lambda: rng.standard_normal((b, h // 8, w // 8, 16), np.float32)  # noqa: E731
        return {"target": lat(), "reference": lat(), "txt": rng.standard_normal((b, 512, 4096), np.float32),
                "y": rng.standard_normal((b, 768), np.float32)}  # fmt: skip

    empty = {"txt": np.zeros((512, 4096), np.float32), "y": np.zeros(768, np.float32)}
    encode.write(str(out), cfg, enc, empty, {"model": "synthetic", "parts": {}}, batch=4, shard_size=64)


def readers(folder: Path, packed: Path, cached: Path, cfg) -> dict:
    from jaxedit.data import reader, records
    from jaxedit.train.data import EditBatches, index_manifest

    fcfg = dataclasses.replace(cfg, path=str(folder))
    index = records.read_index(str(packed))
    shards = records.shard_paths(str(packed), index)
    ccfg = dataclasses.replace(cfg, cache=str(cached))
    return {
        "folder": EditBatches(fcfg, index_manifest(fcfg), 0, 1),
        "shards": reader.ShardBatches(cfg, reader.index_records(cfg), shards, 0, 1),
        "cache": reader.ShardBatches(ccfg, reader.index_records(ccfg), shards, 0, 1, None, index),
    }


def rate(batches, threads: int, start: int, n: int) -> float:
    """Examples a second through the training pipeline's grain iterator (the first batch not timed)."""
    import grain

    ds = grain.MapDataset.range(start, start + n + 1).map(batches)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))))
    next(it)
    t0 = time.perf_counter()
    count = sum(len(next(it)["id"]) for _ in range(n))
    return count / (time.perf_counter() - t0)


PLAN_CODE = """
import json, resource, sys, time, tracemalloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
before = rss()
from jaxedit.data import reader
from jaxedit.train.data import DataConfig, EditBatches
cfg = DataConfig(path=sys.argv[1], batch_size=int(sys.argv[2]), pixel_budget=1024 * 1024, bucket_step=64)
imported = rss()
tracemalloc.start()
t0 = time.perf_counter()
index = reader.index_records(cfg)
batches = EditBatches(cfg, index, 0, int(sys.argv[3]))
plan = batches.plan(0)
seconds = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] / 1e6
tracemalloc.stop()
print(json.dumps({"rss_before": before, "rss_imported": imported, "rss_after": rss(), "peak": peak,
                  "seconds": seconds, "batches": len(plan),
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}))
"""


def synthetic_index(out: Path, n: int, per_shard: int = 1000) -> None:
    """index.json + sizes.npy of n examples (no shards, no images): what the reader plans from."""
    import numpy as np

    from jaxedit.data import records

    rng = np.random.default_rng(0)
    choices = np.array([[1024, 1024], [1184, 880], [880, 1184], [1344, 768], [768, 1344]], np.int32)
    target = choices[rng.integers(0, len(choices), n)]
    sizes = np.stack([target, target], 1)
    out.mkdir(parents=True)
    buf = io.BytesIO()
    np.save(buf, sizes)
    (out / records.SIZES).write_bytes(buf.getvalue())
    shards = [{"path": f"shards/{k:05d}.array_record", "records": min(per_shard, n - a), "bytes": 0,
               "sha256": "0" * 64} for k, a in enumerate(range(0, n, per_shard))]  # fmt: skip
    index = {"format": records.FORMAT, "version": records.VERSION, "input": "synthetic", "rows": n, "examples": n,
             "max_sources": 1, "bad_rows": {}, "settings": {}, "buckets": [], "groups": {}, "seconds": 0,
             "shards": shards}  # fmt: skip
    (out / records.INDEX).write_text(json.dumps(index))


def planning(root: Path, n: int, batch: int, processes: int) -> dict:
    synthetic_index(root / f"index{n}", n)
    r = subprocess.run([sys.executable, "-c", PLAN_CODE, str(root / f"index{n}"), str(batch), str(processes)],
                       env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


def consumption() -> list[tuple[str, float, float, float]]:
    """(train row, per-host examples a step, compiler-estimated s a step, MFU-bound s) of docs/scaling.md's 1024-px
    train rows."""
    out = []
    for line in (ROOT / "docs" / "scaling.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 15 or cells[0] != "train" or cells[5] != "1024" or cells[10] != "yes":  # (edit pairs)
            continue
        chips, batch = int(cells[2]), int(re.match(r"\d+", cells[4]).group())
        hosts = max(1, chips // CHIPS_PER_HOST)
        name = f"{cells[1]} {cells[3]} batch {cells[4]} remat {cells[7]}"
        out.append((name, batch / hosts, float(cells[11]), float(cells[12]) if cells[12] != "-" else float("nan")))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--index", type=int, nargs="+", default=[100_000, 1_000_000])
    args = p.parse_args()
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jaxedit.data import sources
    from jaxedit.data.pack import pack
    from jaxedit.data.records import BucketSettings
    from jaxedit.train.data import DataConfig

    with tempfile.TemporaryDirectory(prefix="jaxedit-data-bench-") as d:
        root = Path(d)
        t0 = time.perf_counter()
        folder = write_pairs(root / "folder", args.examples)
        settings = BucketSettings(1024 * 1024, 64)
        summary = pack(sources.FolderSource(str(folder), 16), str(root / "packed"), settings, workers=2)
        t_pack = time.perf_counter() - t0
        cfg = DataConfig(path=str(root / "packed"), batch_size=4, pixel_budget=1024 * 1024, bucket_step=64)
        t0 = time.perf_counter()
        fake_cache(root / "cache", cfg)
        print(f"{args.examples} pairs of 1024 px JPEGs written and packed in {t_pack:.1f}s ({summary}); cache "
              f"shards (Kontext [dev] shapes, {sum(f.stat().st_size for f in (root / 'cache').rglob('*')) / 1e6:.0f}"
              f" MB) in {time.perf_counter() - t0:.1f}s")  # fmt: skip
        batches = readers(folder, root / "packed", root / "cache", cfg)
        per_epoch = batches["folder"].per_epoch
        n = per_epoch  # one epoch timed a measurement
        got = {}  # (reader, threads) -> [examples/s of each round]
        for r in range(args.rounds):
            for t in args.threads:
                for name, b in batches.items():  # interleaved: the same round's load for every reader
                    got.setdefault((name, t), []).append(rate(b, t, (r * len(args.threads) + t) * n, n))
        print(f"\nexamples/s per host (host batch 4, {n} batches a measurement, median of {args.rounds} rounds; "
              f"ratio: median of the rounds' ratios to the folder reader); {os.cpu_count()} CPU cores")  # fmt: skip
        print(f"{'threads':>7} | {'folder':>8} | {'shards':>8} {'/folder':>8} | {'cache':>8} {'/folder':>8}")
        for t in args.threads:
            f = got[("folder", t)]
            row = [f"{t:>7}", f"{statistics.median(f):8.2f}"]
            for name in ("shards", "cache"):
                x = got[(name, t)]
                ratio = statistics.median(a / b for a, b in zip(x, f))
                row.append(f"{statistics.median(x):8.2f} {ratio:7.2f}x")
            print(" | ".join(row))
        best = {name: max(statistics.median(got[(name, t)]) for t in args.threads) for name in batches}
        one = {name: statistics.median(got[(name, 1)]) for name in batches} if 1 in args.threads else best

        print("\nreader planning (index_records + EditBatches + the first epoch's plan), global batch 256, 64 hosts:")
        for n_idx in args.index:
            m = planning(root, n_idx, 256, 64)
            print(f"  {n_idx:>9} examples: {m['seconds']:.2f}s, RSS {m['rss_imported']:.0f} -> {m['rss_after']:.0f} "
                  f"MB (+{m['rss_after'] - m['rss_imported']:.0f} MB; {m['rss_before']:.0f} MB before imports), "
                  f"tracemalloc peak {m['peak']:.0f} MB, {m['batches']} batches an epoch")  # fmt: skip

        print("\n1024-px train steps of docs/scaling.md (hosts = chips / 4): examples/s a host needs, at the "
              "compiler's step estimate (and at the MFU bound)")  # fmt: skip
        for name, per_host, est, bound in consumption():
            need, need_b = per_host / est, per_host / bound
            verdict = []
            for reader_name in ("shards", "cache", "folder"):
                ok = [t for t in args.threads if statistics.median(got[(reader_name, t)]) >= need]
                ok_b = [t for t in args.threads if statistics.median(got[(reader_name, t)]) >= need_b]
                at = lambda x: f"{min(x)} thr" if x else "no"  # noqa: E731
                verdict.append(f"{reader_name} {at(ok)}/{at(ok_b)}")
            head = f"  {name}: {per_host:g}/host/step; needs {need:.2f}/s ({need_b:.2f}/s at bound): "
            print(head + ", ".join(verdict))
        print(f"  (reader threads that keep up at the estimate / at the MFU bound; no: none of {args.threads})")
        print("best: " + ", ".join(f"{k} {v:.2f}/s" for k, v in best.items()) + "; 1 thread: "
              + ", ".join(f"{k} {v:.2f}/s" for k, v in one.items()))  # fmt: skip


if __name__ == "__main__":
    main()
