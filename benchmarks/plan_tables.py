"""Run `jaxedit plan` for a list of programs and targets, and render docs/scaling.md's tables from the reports.

    python benchmarks/plan_tables.py run docs/scaling_plans.txt docs/scaling_results.jsonl   # hours: one
        # full-size TPU compile after another (3-25 min each on a 2-core machine); appends JSON reports,
        # skips lines already reported or claimed by another runner, so runs can share the work
    python benchmarks/plan_tables.py render docs/scaling_results.jsonl                        # markdown tables

Each line of the plans file is the arguments of one `jaxedit plan` (without --json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run(plans: Path, results: Path) -> None:
    """Each plan not yet in `results` nor claimed (RESULTS.claims: several runners may share the files; a
    killed runner's claim stays, delete the line to retry it)."""
    claims = results.with_name(results.name + ".claims")
    for line in plans.read_text().splitlines():
        args = line.split("#")[0].strip()
        done = {json.loads(x).get("args") for x in results.read_text().splitlines()} if results.exists() else set()
        claimed = set(claims.read_text().splitlines()) if claims.exists() else set()
        if not args or args in done | claimed:
            continue
        with claims.open("a") as f:
            f.write(args + "\n")
        print(f"plan {args}", flush=True)
        env = os.environ | {"JAX_PLATFORMS": "cpu"}
        out = subprocess.run(
            [sys.executable, "-m", "jaxedit.plan", *args.split(), "--json"], capture_output=True, text=True, env=env
        )
        if out.returncode == 0:
            report = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            report = {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
        with results.open("a") as f:
            f.write(json.dumps({"args": args, **report}) + "\n")


def gb(x) -> str:
    return f"{x / 1e9:.1f}"


def render(results: Path) -> str:
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    out = []
    head = ("| program | target | chips | mesh | batch (/chip) | px | tokens | remat | GB/chip | HBM | fits | "
            "compiler est. s | MFU bound s | est./bound | compile s |")  # fmt: skip
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            out.append(f"| `{r['args']}` | failed: {r['error'][:80]} |")
            continue
        axes = dict(kv.split("=") for kv in r["mesh"].split(",") if "=" in kv)
        tensor = int(axes.get("tensor", 1))
        per = r["batch"] / (r["chips"] // tensor)  # samples per data-parallel group
        est = f"{r['compiler_seconds']:.2f}" if r.get("compiler_seconds") is not None else "-"
        mfu = f"{r['mfu_bound_seconds']:.2f}" if r.get("mfu_bound_seconds") else "-"
        ratio = f"{r['compiler_seconds'] / r['mfu_bound_seconds']:.2f}x" if est != "-" and mfu != "-" else "-"
        program = r["task"] + (f" ({r['preset']})" if r["preset"] != "flux-kontext-dev" else "")
        program += " t2i" if r["reference_tokens"] == 0 and r["task"] not in ("vae-decode", "text") else ""
        program += f" {r['references']} refs" if r.get("references", 1) > 1 else ""
        quantized = r["args"].split("--quantize ", 1)[1].split()[0] if "--quantize " in r["args"] else "none"
        program += f" {quantized}" if quantized != "none" else ""
        program += " (text on host)" if "--text-on-cpu" in r["args"] else ""
        remat = r["remat"] + (f" + MLP in {r['mlp_chunks']}" if r.get("mlp_chunks", 1) > 1 else "")
        out.append(
            f"| {program} | {r['target']} | {r['chips']} | {r['mesh']} | {r['batch']} ({per:g}) | {r['resolution']} | "
            f"{r['tokens']} | {remat} | {gb(r['total'])} | {gb(r['hbm']) if 'hbm' in r else '-'} | "
            f"{'yes' if r.get('fits') else 'NO'} | {est} | {mfu} | {ratio} | {r['compile_s']:.0f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["render"]:
        print(render(Path(sys.argv[2])))
    else:
        sys.exit(__doc__)
