"""Batch jobs' faults (issue #23) with a stand-in pipeline: resume keyed by what produced a result, a torn
results file, non-UTF-8 manifests, bad prompts, lazy decoding, duplicate ids."""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import types
import zlib

import pytest
from PIL import Image, ImageFile

from jaxedit.cli import model_identity
from jaxedit.kontext.pipeline import KontextPipeline
from jaxedit.pipelines.batch import run_job
from jaxedit.step1x.pipeline import Step1XEditPipeline
from tests.test_batch import Pipeline as BatchPipeline

DEFAULTS = {"steps": 2, "guidance": 1.0}


class Pipeline(BatchPipeline):
    """test_batch's stand-in; prompts are encoded as a tokenizer would (a lone surrogate fails the batch), and
    the number of images decoded by the first edit is kept."""

    def __init__(self, decodes=None):
        super().__init__()
        self.decodes, self.decoded_at_first_edit = decodes, None

    def edit(self, prepared, prompts, seeds, guidance, steps):
        if self.decoded_at_first_edit is None and self.decodes is not None:
            self.decoded_at_first_edit = len(self.decodes)
        for p in prompts:
            p.encode("utf-8")  # as a tokenizer does: a lone surrogate raises UnicodeEncodeError, a ValueError
        return super().edit(prepared, prompts, seeds, guidance, steps)


def write_job(tmp_path, lines, n=4):
    """Images 0.png .. n-1.png and a manifest of `lines` (dicts, or bytes written as they are)."""
    for i in range(n):
        Image.new("RGB", (32, 16), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return manifest, tmp_path / "out"


def items(n=4):
    return [{"id": f"i{i}", "image": f"{i}.png", "prompt": f"p{i}"} for i in range(n)]


def latest(out):
    recs = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["id"]] = r
    return recs


def run(manifest, out, pipe=None, **kw):
    kw = {"batch_size": 2, "defaults": DEFAULTS, "progress": False, **kw}
    return run_job(pipe or Pipeline(), manifest, out, **kw)


# item 4
def test_resume_reruns_items_whose_inputs_or_model_changed(tmp_path):
    manifest, out = write_job(tmp_path, items())
    assert run(manifest, out, model="m1") == {"ok": 4, "failed": 0, "skipped": 0}
    assert all(len(r["key"]) == 16 for r in latest(out).values())
    changed = items()
    changed[0]["prompt"] = "another prompt"
    changed[1]["seed"] = 7
    manifest.write_text("".join(json.dumps(x) + "\n" for x in changed))
    Image.new("RGB", (32, 16), (0, 0, 99)).save(tmp_path / "2.png")  # same path and size, other pixels
    pipe = Pipeline()
    assert run(manifest, out, pipe, model="m1") == {"ok": 3, "failed": 0, "skipped": 1}
    assert pipe.calls == [["another prompt", "p1"], ["p2", "p2"]]  # a short last batch is padded
    assert Image.open(out / "i2.png").getpixel((0, 0)) == (0, 0, 99)
    assert run(manifest, out, model="m1")["skipped"] == 4
    assert run(manifest, out, model="m2") == {"ok": 4, "failed": 0, "skipped": 0}  # another model: all again
    # a record of an older version (no key) is stale
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "key"}) + "\n"
                                               for r in recs))  # fmt: skip
    assert run(manifest, out, model="m2")["ok"] == 4


def test_the_batch_commands_model_identity_changes_with_the_folder_and_the_sampling_options(tmp_path):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "jaxedit.json").write_text("{}")
    (folder / "transformer" / "weights").write_bytes(b"1")
    args = argparse.Namespace(model=str(folder), qwen=None, dtype=None, keep_size=False, size_level=None)
    pipe = types.SimpleNamespace(true_cfg_scale=1.0, negative_prompt="")
    identity = model_identity(args, pipe)
    assert model_identity(args, pipe) == identity
    assert model_identity(args, types.SimpleNamespace(true_cfg_scale=3.0, negative_prompt="")) != identity
    assert model_identity(argparse.Namespace(**{**vars(args), "keep_size": True}), pipe) != identity
    # the reference convention, the default "community" too (its meaning changed: see model_identity)
    community = types.SimpleNamespace(true_cfg_scale=1.0, negative_prompt="", reference_ids="community")
    own = types.SimpleNamespace(true_cfg_scale=1.0, negative_prompt="", reference_ids="community-own-sizes")
    assert len({identity, model_identity(args, community), model_identity(args, own)}) == 3
    # --scheduler: the schedule it made (absent without the flag: earlier results keep their keys)
    from jaxedit.configs import SCHEDULERS

    lightning = types.SimpleNamespace(true_cfg_scale=1.0, negative_prompt="", scheduler=SCHEDULERS["lightning"])
    assert model_identity(args, lightning) == identity
    flagged = argparse.Namespace(**{**vars(args), "scheduler": "lightning"})
    assert model_identity(flagged, lightning) != identity
    (folder / "transformer" / "weights").write_bytes(b"22")  # a part rewritten
    assert model_identity(args, pipe) != identity
    # sealed parts count by content: a copy of the folder is the same model, a rewritten part is not
    from jaxedit.checkpoint import seal

    seal(folder / "transformer")
    identity = model_identity(args, pipe)
    shutil.copytree(folder, tmp_path / "copy")
    assert model_identity(argparse.Namespace(**{**vars(args), "model": str(tmp_path / "copy")}), pipe) == identity
    (folder / "transformer" / "weights").write_bytes(b"33")
    seal(folder / "transformer")
    assert model_identity(args, pipe) != identity


# item 5a
def test_a_torn_last_results_line_is_cut_off_once_and_bad_middle_lines_are_skipped(tmp_path):
    manifest, out = write_job(tmp_path, items())
    run(manifest, out)
    with open(out / "results.jsonl", "ab") as f:
        f.write(b"not json\n\xff\xfe garbage\n" + json.dumps({"id": "i9", "status": "ok"}).encode()[:-7])
    (out / "i3.png").unlink()
    logged = []
    assert run(manifest, out, log=logged.append) == {"ok": 1, "failed": 0, "skipped": 3}
    torn = [s for s in logged if "torn last line" in s]
    assert len(torn) == 1 and "results.jsonl" in torn[0]
    assert any("lines 5, 6" in s for s in logged)  # the unreadable middle lines, by number
    lines = (out / "results.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and json.loads(lines[-2])["id"] == "i3"  # appended on a line of its own
    logged.clear()
    assert run(manifest, out, log=logged.append)["skipped"] == 4
    assert not [s for s in logged if "torn last line" in s]


# item 7
def test_a_non_utf8_manifest_line_fails_alone_named_by_its_line(tmp_path):
    lines = items(3)
    lines.insert(1, b'{"id": "latin1", "image": "0.png", "prompt": "caf\xe9"}')
    manifest, out = write_job(tmp_path, lines)
    assert run(manifest, out) == {"ok": 3, "failed": 1, "skipped": 0}
    (bad,) = [r for r in latest(out).values() if r["status"] == "failed"]
    assert bad["id"] == "line00002" and f"{manifest}:2: not UTF-8" in bad["error"] and "0xe9" in bad["error"]


# item 8
def test_a_bad_prompt_fails_alone_before_batching(tmp_path):
    lines = items(4)
    lines[1]["prompt"] = "lone \ud800 surrogate"
    lines[3]["prompt"] = ["a", "list"]
    manifest, out = write_job(tmp_path, lines + [{"id": "n", "image": "0.png", "prompt": 5}])
    pipe = Pipeline()
    assert run(manifest, out, pipe) == {"ok": 2, "failed": 3, "skipped": 0}
    r = latest(out)
    assert r["i0"]["status"] == r["i2"]["status"] == "ok"  # the bad prompts' batch-mates
    assert "m.jsonl:2: field 'prompt'" in r["i1"]["error"] and "surrogate" in r["i1"]["error"]
    assert "m.jsonl:4: field 'prompt' must be a string, got list" in r["i3"]["error"]
    assert "must be a string, got int" in r["n"]["error"]
    assert all(isinstance(p, str) and p.encode() for c in pipe.calls for p in c)


def huge_png(path, w, h):
    """A valid 1-bit PNG of w x h zeros: a few KB on disk, w*h bytes once decoded."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    z = zlib.compressobj(9)
    row = bytes(1 + (w + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# item 9
def test_images_are_decoded_per_batch_and_huge_ones_refused_from_the_header(tmp_path, monkeypatch):
    decodes = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (im.tile and decodes.append(im.filename)) or load(im))
    huge_png(tmp_path / "huge.png", 13000, 13000)
    lines = items(6) + [{"id": "huge", "image": "huge.png", "prompt": "x"}]
    manifest, out = write_job(tmp_path, lines, n=6)
    pipe = Pipeline(decodes)
    assert run(manifest, out, pipe) == {"ok": 6, "failed": 1, "skipped": 0}
    assert pipe.decoded_at_first_edit <= 2 and len(decodes) == 6  # one batch before the first edit, each once
    error = latest(out)["huge"]["error"]
    assert "huge.png" in error and "13000x13000" in error and not any(f.endswith("huge.png") for f in decodes)


def outcome(f, *args):
    """f(*args), or the message of the ValueError it raises."""
    try:
        return f(*args)
    except ValueError as e:
        return str(e)


def test_the_pipelines_bucket_from_an_images_size_as_prepare_does():
    """`bucket_for` (the header's size) and `prepare` (the decoded image) agree, also on refusals, on pipelines
    built without a model (only the attribute their sizes depend on)."""
    cases = [((100, 77), None, None), ((300, 40), None, None), ((64, 48), 80, None), ((64, 48), None, 32)]
    cases += [((8, 8), None, None), ((64, 48), 8000, None)]
    pipelines = [(KontextPipeline, "auto_resize", v) for v in (True, False)]
    pipelines += [(Step1XEditPipeline, "size_level", v) for v in (512, None)]
    for cls, attr, value in pipelines:
        pipe = object.__new__(cls)
        setattr(pipe, attr, value)
        for size, w, h in cases:
            prepared = outcome(pipe.prepare, Image.new("RGB", size), w, h)
            assert outcome(pipe.bucket_for, size, w, h) == getattr(prepared, "bucket", prepared)
        assert "outside" in outcome(pipe.bucket_for, (64, 48), 8000, None)
    kontext = object.__new__(KontextPipeline)
    assert kontext.bucket_for(None, 64, 48) == kontext.prepare(None, 64, 48).bucket == (64, 48, None)


# item 13b
def test_a_failing_line_reusing_a_valid_id_is_reported_and_does_not_rerun_the_valid_item(tmp_path):
    lines = items(2) + [{"id": "i0", "image": "1.png", "prompt": "x", "seed": "seven"}]
    manifest, out = write_job(tmp_path, lines)
    assert run(manifest, out) == {"ok": 2, "failed": 1, "skipped": 0}
    r = latest(out)
    assert r["i0"]["status"] == "ok"
    assert "duplicate id 'i0' (first used on line 1)" in r["line00003"]["error"] and "seed" in r["line00003"]["error"]
    pipe = Pipeline()
    assert run(manifest, out, pipe) == {"ok": 0, "failed": 1, "skipped": 2} and pipe.calls == []


# issue #35, item 2
def test_one_job_per_output_folder_and_resume_checks_the_pngs_hash(tmp_path, capsys):
    """A second job into a folder another job is writing refuses in one line naming the holder (the lock file);
    a temporary of the old fixed name left by another run is no obstacle (temporaries are per process); a PNG
    replaced under an ok record (another manifest's image of the same id) is not trusted: the item reruns."""
    import fcntl

    from jaxedit.cli import main as cli

    manifest, out = write_job(tmp_path, items())
    out.mkdir()
    (out / "i0.png.tmp").mkdir()  # where another run of the old code was writing
    with open(out / ".jaxedit-batch.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere, since 2026-01-01 00:00:00\n")
        held.flush()
        with pytest.raises(Exception, match=r"is being written by another jaxedit batch \(pid 4242 on elsewhere"):
            run(manifest, out)
        assert not (out / "results.jsonl").exists()
        assert cli(["batch", "--manifest", str(manifest), "--out", str(out), "--model", str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pid 4242 on elsewhere" in err and "Traceback" not in err, err
    assert run(manifest, out) == {"ok": 4, "failed": 0, "skipped": 0}  # released: the folder is free again
    assert not list(out.glob(".*.tmp"))
    Image.new("RGB", (32, 16), (1, 2, 3)).save(out / "i1.png")  # another job's image under i1's name
    pipe = Pipeline()
    assert run(manifest, out, pipe) == {"ok": 1, "failed": 0, "skipped": 3} and pipe.calls == [["p1", "p1"]]
    assert Image.open(out / "i1.png").getpixel((0, 0)) == (10, 0, 0)
    assert run(manifest, out)["skipped"] == 4
