"""Batch jobs (`jaxedit.pipelines.batch.run_job`) with a stand-in pipeline: a bad item fails alone, a
fault of the program stops the job without recording anything against the items, a rerun continues; items of
several reference images."""

from __future__ import annotations

import json
import types

import pytest
from PIL import Image

from jaxedit.kontext.pipeline import KontextPipeline
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


class Kontext(KontextPipeline):
    """KontextPipeline's sizes and buckets without a model (auto-resize off); an edit is a blank target."""

    def __init__(self, **references):
        self.auto_resize, self.calls = False, []
        self.set_references(**references)

    def edit(self, prepared, prompts, seeds, guidance, steps):
        self.calls.append([p.bucket for p in prepared])
        return [Image.new("RGB", (p.width, p.height)) for p in prepared]


def test_items_of_several_images_bucket_by_their_sizes_and_fail_alone(tmp_path):
    """ "images" lines batch with items of the same reference count and sizes (each reference at its own size:
    "community-own-sizes"); a missing second image, a too small one, too many tokens, "image" with "images", a
    model of one image: each fails alone, naming it."""
    for name, (w, h) in {"a": (64, 48), "b": (64, 48), "c": (32, 32), "tiny": (8, 8)}.items():
        Image.new("RGB", (w, h)).save(tmp_path / f"{name}.png")
    lines = [{"id": "one", "image": "a.png"}, {"id": "two", "images": ["a.png", "b.png"]},
             {"id": "two_b", "images": ["b.png", "a.png"]}, {"id": "mixed", "images": ["a.png", "c.png", "c.png"]},
             {"id": "missing", "images": ["a.png", "nope.png"]}, {"id": "small", "images": ["a.png", "tiny.png"]},
             {"id": "many", "images": ["a.png"] * 5}, {"id": "both", "image": "a.png", "images": ["b.png"]},
             {"id": "empty", "images": []}]  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x | {"prompt": "p"}) + "\n" for x in lines))
    pipe = Kontext(ids="community-own-sizes", max_image_tokens=4 * 12)  # a 64x48 image: 12 tokens
    counts = run_job(pipe, manifest, tmp_path / "out", batch_size=2, defaults=DEFAULTS, progress=False)
    assert counts == {"ok": 4, "failed": 5, "skipped": 0}
    recs = {r["id"]: r for r in records(tmp_path / "out")}
    assert "image not found" in recs["missing"]["error"] and "nope.png" in recs["missing"]["error"]
    assert "reference 2 of 2: image 8x8 is smaller than 16x16" in recs["small"]["error"]
    assert "5 reference(s) and the target make 72 image tokens, over the maximum of 48" in recs["many"]["error"]
    assert "not both" in recs["both"]["error"] and "non-empty list" in recs["empty"]["error"]
    assert len(pipe.calls) == 3  # one batch per bucket: "two" and "two_b" together
    assert sorted(c[0][2] for c in pipe.calls) == [((48, 64),), ((48, 64), (32, 32), (32, 32)), ((48, 64), (48, 64))]
    assert (Image.open(tmp_path / "out" / "mixed.png").size) == (64, 48)  # the first reference's size
    # a model of one input image refuses them, naming the field; a changed second image reruns its item
    one = run_job(Pipeline(), manifest, tmp_path / "one", defaults=DEFAULTS, progress=False)
    assert one["ok"] == 1 and "field 'images': this model takes one input image, got 2" in str(
        {r["id"]: r["error"] for r in records(tmp_path / "one")}["two"]
    )
    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "b.png")
    again = run_job(pipe, manifest, tmp_path / "out", batch_size=2, defaults=DEFAULTS, progress=False)
    assert again == {"ok": 2, "failed": 5, "skipped": 2}  # "two" and "two_b" (both read b.png)


def test_several_references_sizes_from_the_headers_as_prepare_does():
    """bucket_for (sizes) = prepare (images).bucket; "community" gives every reference the first's size (as if
    alone), "community-own-sizes" each its own; reference_tokens scales an item's references together."""
    sizes = [(100, 77), (300, 40), (64, 64)]
    for auto, tokens in ((True, None), (False, None), (True, 4096), (False, 20)):
        for ids in ("community", "community-own-sizes"):
            pipe = Kontext(ids=ids, tokens=tokens)
            pipe.auto_resize = auto
            bucket = pipe.bucket_for(sizes)
            assert bucket == pipe.prepare([Image.new("RGB", s) for s in sizes]).bucket
            refs, alone = [(w, h) for h, w in bucket[2]], Kontext()
            alone.auto_resize = auto
            own = [alone.sizes(s)[0][0] for s in sizes]  # each as if alone
            assert bucket[:2] == own[0]  # the target: the first reference's size, as if alone
            if tokens is None:
                assert refs == (own[:1] * 3 if ids == "community" else own)
            else:
                assert sum(w * h for w, h in refs) // 256 <= tokens
                assert len(set(refs)) == (1 if ids == "community" else 3)
    assert Kontext(tokens=4096).bucket_for([(1024, 1024)] * 2)[2] == ((720, 720), (720, 720))
    with pytest.raises(ValueError, match="reference_tokens 1 is too few"):
        Kontext(tokens=1).bucket_for([(64, 64), (64, 64)])
    with pytest.raises(ValueError, match="'diagonal': use one of community, community-own-sizes, offset, index"):
        Kontext(ids="diagonal")
