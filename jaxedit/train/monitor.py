"""Training observability: progress line, metrics JSONL, optional TensorBoard, sample edits.

Only the main process (jax.process_index() == 0) prints and writes. TensorBoard event files
(`<checkpoint_dir>/tensorboard`) are written when the optional `tensorboardX` is installed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxedit.image_files import upright
from jaxedit.staged import write_file

log = logging.getLogger(__name__)


def _tensorboard_writer(logdir: Path):
    """A tensorboardX SummaryWriter when tensorboardX is installed (optional), else None."""
    try:
        from tensorboardX import SummaryWriter  # type: ignore[import-not-found]
    except ImportError:
        return None
    return SummaryWriter(str(logdir))


def progress_line(step: int, total: int, metrics: dict[str, float], samples_per_s: float, eta_s: float) -> str:
    """`step 450/1000 loss 0.41000 12.30 samples/s ETA 00:07:31 [#########...........]  45%`."""
    width = 20
    filled = int(width * step / max(total, 1))
    eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0.0)))
    loss = f"loss {metrics['loss']:.5f} " if "loss" in metrics else ""
    bar = "#" * filled + "." * (width - filled)
    pct = 100 * step / max(total, 1)
    return f"step {step}/{total} {loss}{samples_per_s:.2f} samples/s ETA {eta} [{bar}] {pct:3.0f}%"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records after `step` (a restarted run re-logs the steps after its checkpoint) and a torn last
    line (a write cut by a kill: no newline, not JSON; one warning). Other lines that are not JSON are kept."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n") and _record(lines[-1]) is None:
        log.warning("%s: cut off a torn last line (%d characters) left by an interrupted write", path, len(lines[-1]))
        lines.pop()
    keep = [ln.rstrip("\n") + "\n" for ln in lines if ln.strip() and not _after(_record(ln), step)]
    write_file(path, "".join(keep))


def _record(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _after(record, step: int) -> bool:
    return isinstance(record, dict) and isinstance(record.get("step"), int | float) and record["step"] > step


class Monitor:
    """Progress on stdout, one JSON record a logged step in `metrics.jsonl`, TensorBoard scalars. Opening it
    (main process) drops the file's records after `start_step` and a torn last line (`truncate_metrics`)."""

    def __init__(self, out_dir: Path, total_steps: int, batch_size: int, start_step: int, lead: bool, tb: bool = True):
        self.out_dir, self.total, self.batch, self.start, self.lead = out_dir, total_steps, batch_size, start_step, lead
        if lead:
            truncate_metrics(out_dir / "metrics.jsonl", start_step)
        self.t0 = time.perf_counter()
        self.writer = _tensorboard_writer(out_dir / "tensorboard") if (lead and tb) else None

    def log(self, step: int, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record step `step` (1-based, after the update); returns the record."""
        m = {k: float(v) for k, v in metrics.items()}
        elapsed = time.perf_counter() - self.t0
        sps = (step - self.start) * self.batch / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / max(step - self.start, 1)
        record = {"step": step, **m, "samples_per_s": sps, **(extra or {})}
        if self.lead:
            print(progress_line(step, self.total, m, sps, eta), flush=True)
            with (self.out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, int | float):
                        self.writer.add_scalar(k, v, step)
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SampleEdits:
    """Edits of a few fixed training items with the current weights, written as image grids.

    Each row of `<out_dir>/samples/step_<step>.png` is source | edited | target for one item (its
    first source; all of them are edited with).
    Needs the model folder's text encoders and VAE on this host; parameters sharded over
    several processes are skipped (gathering a full-size model onto one host is not worth it).
    """

    def __init__(self, pipe, items: list, out_dir: Path, steps: int | None = None, guidance: float | None = None):
        """pipe: the model folder's editing pipeline (`jaxedit.pipelines.auto.load_pipeline`), whose
        transformer parameters are replaced by the run's at each call."""
        self.pipe = pipe
        self.items, self.steps, self.guidance = items, steps, guidance
        self.dir = out_dir / "samples"
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, transformer_params) -> Path | None:
        import jax

        if not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(transformer_params)):
            log.warning("sample edits skipped: parameters span several processes")
            return None
        self.pipe.set_transformer(transformer_params)
        paths = [[p for p, _ in getattr(it, "sources", ())] or [it.source] for it in self.items]
        images = [[upright(Image.open(p)).convert("RGB") for p in item] for item in paths]
        sources = [x[0] for x in images]
        seeds = list(range(len(self.items)))
        outs = self.pipe(
            [x if len(x) > 1 else x[0] for x in images], [it.instruction for it in self.items], seeds,
            steps=self.steps, guidance=self.guidance,
        )  # fmt: skip
        rows = []
        for src, out, it in zip(sources, outs, self.items):
            tgt = upright(Image.open(it.target)).convert("RGB").resize(out.size)
            rows.append(np.concatenate([np.asarray(src.resize(out.size)), np.asarray(out), np.asarray(tgt)], axis=1))
        path = self.dir / f"step_{step:07d}.png"
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)
        return path
