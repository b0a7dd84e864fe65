"""Step caching on the shipped default model: quality against transformer calls and wall time (issue #40 item 3).

    python benchmarks/cache_quality.py [--count 240] [--batch 8] [--caches off,fbc:0.05,...] \
        [--markdown docs/x.md --svg docs/x.svg]

Every setting edits the same held-out shapes samples (test split, indices 0..count-1, seed = index, the model
folder's sampling options: 12 Euler steps, true CFG 2, so 24 transformer calls per uncached edit). The settings run
side by side, interleaved batch by batch (the machine is shared: a loaded minute slows every setting alike), each
compiled once before timing. Per setting: transformer calls per edit (what each item computed: with true CFG a step
counts 2 calls unless both of its calls reused), the judge's success rate and the PSNR gain over the do-nothing
baseline (as benchmarks/demo_quality.py), and the wall time of its edits. "schedule@fbc:T" (or @tea:T) is a static
schedule calibrated (`jaxedit.step_cache.calibrate`) on 8 training-split items with that cache.

With per-item decisions a batch skips the blocks only on steps where all its items reuse; the calls column is
per item (a batch of one), the wall time is at --batch.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from common import ROOT  # noqa: F401 - puts the repo root on sys.path
from PIL import Image

import shapes
from jaxedit import DEFAULT_MODEL, step_cache

CACHES = (
    "off,fbc:0.03,fbc:0.06,fbc:0.1,fbc:0.15,fbc:0.2,fbc:0.3,tea:0.1,tea:0.2,tea:0.4,tea:0.8,schedule@fbc:0.1,"
    "schedule@fbc:0.2,schedule@tea:0.4"
)


def settings(pipe, names: list[str]) -> dict[str, object]:
    """Cache name -> what `pipe(..., cache=)` takes (schedules calibrated here, on training-split items)."""
    out = {}
    for name in names:
        if name.startswith("schedule@"):
            train = [shapes.sample("train", i) for i in range(8)]
            spec = step_cache.parse(name.removeprefix("schedule@"))
            cal = step_cache.calibrate(pipe, [Image.fromarray(s.source) for s in train],
                                       [s.instruction for s in train], list(range(8)), spec.threshold,
                                       signal=spec.signal)  # fmt: skip
            out[name] = step_cache.CacheSpec(skips=tuple(cal["skips"]))
        else:
            out[name] = step_cache.parse(name)
    return out


def run(pipe, caches: dict, count: int, batch: int) -> dict[str, list[dict]]:
    """Edit samples 0..count-1 under every cache, interleaved batch by batch; rows per cache."""
    samples = [shapes.sample("test", i) for i in range(count)]
    rows, seconds = defaultdict(list), defaultdict(float)
    steps, cfg_calls = pipe.default_steps, 2 if pipe.true_cfg_scale not in (None, 1.0) else 1
    for cache in caches.values():  # compile each program before timing
        pipe([Image.fromarray(samples[0].source)] * batch, [samples[0].instruction] * batch, [0] * batch, cache=cache)
    for lo in range(0, count, batch):
        chunk = samples[lo : lo + batch]
        images, prompts, seeds = (
            [Image.fromarray(s.source) for s in chunk],
            [s.instruction for s in chunk],
            [s.index for s in chunk],
        )
        for name, cache in caches.items():
            t0 = time.perf_counter()
            outs = pipe(images, prompts, seeds, cache=cache)
            seconds[name] += time.perf_counter() - t0
            reused = np.zeros(len(chunk), int) if cache is None else pipe.last_cache_skips.sum(axis=0)
            for s, out, r in zip(chunk, outs, reused):
                edited = np.asarray(out.convert("RGB"))
                rows[name].append({"index": s.index, "edit": s.edit, "ok": shapes.judge(edited, s.target).ok,
                                   "psnr_edit": shapes.psnr(edited, s.target),
                                   "psnr_source": shapes.psnr(s.source, s.target),
                                   "calls": (steps - int(r)) * cfg_calls})  # fmt: skip
        print(f"  {lo + len(chunk)}/{count}", flush=True)
    for name in rows:
        rows[name][0]["seconds"] = seconds[name]
    return rows


def table(rows: dict[str, list[dict]], full_calls: int) -> tuple[str, list[tuple]]:
    lines = [
        "| cache | calls per edit | calls saved | judged correct | PSNR gain (dB) | wall time (s) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    base = rows["off"][0]["seconds"] if "off" in rows else None
    points = []
    for name, r in rows.items():
        calls = np.mean([x["calls"] for x in r])
        ok = 100 * np.mean([x["ok"] for x in r])
        gain = np.mean([x["psnr_edit"] - x["psnr_source"] for x in r])
        sec = r[0]["seconds"]
        speed = f"{base / sec:.2f}x" if base else "-"
        lines.append(f"| {name} | {calls:.1f} | {100 * (1 - calls / full_calls):.0f}% | {ok:.1f}% | {gain:+.2f} | "
                     f"{sec:.1f} | {speed} |")  # fmt: skip
        points.append((name, calls, ok, gain))
    return "\n".join(lines), points


def svg(points: list[tuple], full_calls: int) -> str:
    """Judged-correct rate against calls per edit, one labelled point per setting (a hand-written SVG: no
    plotting library needed)."""
    w, h, m = 560, 360, 50
    ys = [p[2] for p in points]
    y0, y1 = max(0.0, min(ys) - 5), min(100.0, max(ys) + 5)
    px = lambda c: m + (w - 2 * m) * c / full_calls  # noqa: E731
    py = lambda v: h - m - (h - 2 * m) * (v - y0) / max(y1 - y0, 1e-9)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">transformer calls per edit</text>',
           f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">judged correct (%)'
           "</text>"]  # fmt: skip
    for c in range(0, full_calls + 1, 4):
        out.append(f'<text x="{px(c)}" y="{h - m + 14}" text-anchor="middle">{c}</text>')
    for v in np.linspace(y0, y1, 5):
        out.append(f'<text x="{m - 4}" y="{py(v) + 4}" text-anchor="end">{v:.0f}</text>')
    for name, calls, ok, _ in points:
        colour = {"off": "black", "fbc": "#1f77b4", "tea": "#2ca02c"}.get(name.split(":")[0], "#d62728")
        out.append(f'<circle cx="{px(calls):.1f}" cy="{py(ok):.1f}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{px(calls) + 6:.1f}" y="{py(ok) - 6:.1f}">{name}</text>')
    return "\n".join([*out, "</svg>"]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--count", type=int, default=240)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--caches", default=CACHES, help=f"comma-separated (default {CACHES})")
    p.add_argument("--markdown", help="also write the table here")
    p.add_argument("--svg", help="also write the plot (judged correct against calls) here")
    args = p.parse_args()
    from jaxedit.kontext.pipeline import KontextPipeline

    pipe = KontextPipeline.load(args.model)
    full = pipe.default_steps * (2 if pipe.true_cfg_scale not in (None, 1.0) else 1)
    caches = settings(pipe, args.caches.split(","))
    for name, c in caches.items():
        print(f"{name}: {c.text if c is not None else 'uncached'}")
    rows = run(pipe, caches, args.count, args.batch)
    out, points = table(rows, full)
    print(out)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(out + "\n")
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg(points, full))


if __name__ == "__main__":
    main()
