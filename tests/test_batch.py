"""Batch jobs (`jaxedit.pipelines.batch.run_job`) with a stand-in pipeline: a bad item fails alone, a
fault of the program stops the job without recording anything against the items, a rerun continues."""

from __future__ import annotations

import json
import types

import pytest
from PIL import Image

from jaxedit.pipelines.batch import ProgramFault, run_job

DEFAULTS = {"steps": 2, "guidance": 1.0}


class Pipeline:
    """Edits are the input image; `fault` is raised by the call that edits the item named `fault_on`."""

    def __init__(self, fault=None, fault_on=None):
        self.fault, self.fault_on, self.calls = fault, fault_on, []

    def bucket_for(self, size, width, height):
        if size[0] > 100:
            raise ValueError(f"image {size[0]} px wide is too wide for this stand-in")
        return size

    def prepare(self, image, width, height):
        if image.size[0] > 100:
            raise ValueError(f"image {image.size[0]} px wide is too wide for this stand-in")
        return types.SimpleNamespace(bucket=image.size, image=image)

    def edit(self, prepared, prompts, seeds, guidance, steps):
        self.calls.append(list(prompts))
        if self.fault is not None and self.fault_on in prompts:
            raise self.fault
        return [p.image for p in prepared]


def job(tmp_path, n=4):
    for i in range(n):
        Image.new("RGB", (32, 16), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
    Image.new("RGB", (160, 16)).save(tmp_path / "wide.png")
    lines = [{"id": f"i{i}", "image": f"{i}.png", "prompt": f"p{i}"} for i in range(n)]
    lines.append({"id": "wide", "image": "wide.png", "prompt": "p"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest, tmp_path / "out"


def records(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_a_program_fault_stops_the_job_and_records_nothing_against_the_items(tmp_path):
    manifest, out = job(tmp_path)
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.3G\nmore detail")
    with pytest.raises(ProgramFault, match=r"item\(s\) i2, i3: RuntimeError: RESOURCE_EXHAUSTED: Out of mem"):
        run_job(Pipeline(oom, "p2"), manifest, out, batch_size=2, defaults=DEFAULTS, progress=False)
    recs = {r["id"]: r["status"] for r in records(out)}
    assert recs == {"wide": "failed", "i0": "ok", "i1": "ok"}  # the bad item fails alone; i2, i3: nothing
    # a rerun does what is left
    pipe = Pipeline()
    counts = run_job(pipe, manifest, out, batch_size=2, defaults=DEFAULTS, progress=False)
    assert counts == {"ok": 2, "failed": 1, "skipped": 2} and pipe.calls == [["p2", "p3"]]
    assert {r["id"] for r in records(out) if r["status"] == "ok"} == {"i0", "i1", "i2", "i3"}


def test_an_error_of_the_items_inputs_fails_those_items_and_the_job_goes_on(tmp_path):
    manifest, out = job(tmp_path)
    bad = ValueError("prompt too long for this stand-in")
    counts = run_job(Pipeline(bad, "p0"), manifest, out, batch_size=2, defaults=DEFAULTS, progress=False)
    assert counts == {"ok": 2, "failed": 3, "skipped": 0}
    failed = {r["id"]: r["error"] for r in records(out) if r["status"] == "failed"}
    assert set(failed) == {"wide", "i0", "i1"} and "prompt too long" in failed["i0"]
