"""`python -m infer`: batch manifest with real bad files, failure isolation, resume, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jaxedit.cli import main as cli


def write_png(path, w, h, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def job(tmp_path, tiny_kontext):
    _, model = tiny_kontext
    d = tmp_path / "in"
    d.mkdir()
    write_png(d / "a.png", 64, 48, 1)
    write_png(d / "b.png", 64, 48, 2)
    write_png(d / "c.png", 48, 64, 3)
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(d / "gray.jpg")  # grayscale JPEG: converted to RGB
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (d / "notes.jpg").write_text("this is not an image")
    lines = [
        {"id": "a", "image": "in/a.png", "prompt": "make it red", "seed": 1},
        {"id": "b", "image": "in/b.png", "prompt": "make it blue", "guidance": 4.0},
        {"id": "c", "image": "in/c.png", "prompt": "portrait", "steps": 3},
        {"id": "gray", "image": "in/gray.jpg", "prompt": "colourise"},
        {"id": "missing", "image": "in/nope.png", "prompt": "x"},
        {"id": "corrupt", "image": "in/corrupt.png", "prompt": "x"},
        {"id": "notimage", "image": "in/notes.jpg", "prompt": "x"},
        {"id": "empty", "image": "in/a.png", "prompt": "   "},
        {"id": "huge", "image": "in/a.png", "prompt": "x", "width": 100000},
        {"id": "../escape", "image": "in/a.png", "prompt": "x"},
        {"id": "a", "image": "in/b.png", "prompt": "duplicate id"},
        {"id": "badseed", "image": "in/a.png", "prompt": "x", "seed": "seven"},
    ]
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return model, manifest, tmp_path / "out"


def results(out):
    recs = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["id"]] = r
    return recs


def test_batch_job_isolates_bad_items_and_resumes(job, capsys):
    model, manifest, out = job
    argv = ["--model", str(model), "--manifest", str(manifest), "--out", str(out), "--batch-size", "2",
            "--steps", "2", "--dtype", "float32", "--keep-size"]  # fmt: skip
    assert cli(["batch", *argv]) == 1  # some items failed
    r = results(out)
    for ok in ("a", "b", "c", "gray"):
        assert r[ok]["status"] == "ok", r[ok]
        im = Image.open(out / f"{ok}.png")
        assert im.size == (r[ok]["width"], r[ok]["height"])
    assert r["c"]["steps"] == 3 and r["b"]["guidance"] == 4.0 and r["a"]["seed"] == 1
    reasons = {k: v["error"] for k, v in r.items() if v["status"] == "failed"}
    assert "image not found" in reasons["missing"] and "nope.png" in reasons["missing"]
    assert "cannot read image" in reasons["corrupt"] and "corrupt.png" in reasons["corrupt"]
    assert "cannot read image" in reasons["notimage"]
    assert "prompt" in reasons["empty"]
    assert "width" in reasons["huge"]
    assert any("'../escape' is not a safe file name" in v for v in reasons.values())
    assert any("duplicate id 'a' (first used on line 1)" in v for v in reasons.values())
    assert any("invalid JSON" in v for v in reasons.values())
    assert any("'seed' must be an integer" in v for v in reasons.values())
    assert len(reasons) == 9 and len(r) == 13
    assert not list(out.parent.glob("escape*")) and not (out.parent / "escape.png").exists()
    progress = capsys.readouterr().err
    assert "items" in progress and "ETA" in progress

    # re-running skips what is done and does not rewrite it
    stamp = (out / "a.png").stat().st_mtime_ns
    assert cli(["batch", *argv]) == 1  # the bad items still fail
    assert (out / "a.png").stat().st_mtime_ns == stamp
    assert "0 ok, 9 failed, 4 skipped" in capsys.readouterr().out


def test_single_edit_command_and_true_cfg_flags(tmp_path, tiny_kontext, capsys):
    """An edit, then the same with true CFG (the negative branch changes the output); a missing image and a
    true-cfg-scale below 1 are one-line errors."""
    _, model = tiny_kontext
    write_png(tmp_path / "in.png", 64, 48)
    base = ["edit", "--model", str(model), "--image", str(tmp_path / "in.png"), "--prompt", "make it red",
            "--steps", "2", "--keep-size"]  # fmt: skip
    out = tmp_path / "sub" / "edited.png"
    assert cli(base + ["--out", str(out)]) == 0 and Image.open(out).size == (64, 48)
    assert str(out) in capsys.readouterr().out
    cfg_out = tmp_path / "cfg.png"
    assert cli(base + ["--out", str(cfg_out), "--true-cfg-scale", "3", "--negative-prompt", "blurry"]) == 0
    plain, cfg = (np.asarray(Image.open(p), np.int32) for p in (out, cfg_out))
    assert np.abs(plain - cfg).max() > 0  # the negative branch is used
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(base + ["--out", str(tmp_path / "x.png"), "--true-cfg-scale", "0.5"])
    assert e.value.code == 2 and "--true-cfg-scale" in capsys.readouterr().err
    assert cli(["edit", "--model", str(model), "--image", str(tmp_path / "nope.png"), "--prompt", "x",
                "--out", str(out)]) == 2  # fmt: skip
    assert "nope.png" in capsys.readouterr().err


def test_readme_main_job_with_shipped_default_model(tmp_path, capsys):
    """The README's first command: an edit of a shipped example with the default model folder."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "edited.png"
    assert cli(["edit", "--image", str(root / "examples" / "shapes.png"), "--prompt", "make the red circle blue",
                       "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size == Image.open(root / "examples" / "shapes.png").size
    assert f"wrote {out}" in capsys.readouterr().out


def test_zero_steps_is_an_error_not_the_default(capsys):
    """`--steps 0` is refused with one line (it used to become the model's default silently)."""
    with pytest.raises(SystemExit) as e:
        cli(["edit", "--image", "x.png", "--prompt", "p", "--out", "o.png", "--steps", "0"])
    assert e.value.code == 2 and "--steps: 0 is not >= 1" in capsys.readouterr().err
    from jaxedit.pipelines.base import check_steps

    assert check_steps(None, 28) == 28 and check_steps(3, 28) == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            check_steps(bad, 28)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--guidance", "nan"], "field 'guidance' must be a finite number"),
        (["--seed", str(2**40)], "field 'seed'=1099511627776 is outside"),
        (["--steps", "100000"], "field 'steps'=100000 is outside [1, 1000]"),
        (["--out", "."], "is a folder"),
        (["--out", "edited.jpg"], "end its name with .png"),
        (["--prompt", " "], "field 'prompt' is empty"),
    ],
)
def test_single_edit_validates_like_a_batch_item_before_loading(flags, message, tmp_path, capsys):
    """One line, exit 2, before the model is loaded: the batch path's item validation and the output path."""
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(image)
    base = {"--image": str(image), "--prompt": "make it red", "--out": str(tmp_path / "o.png")}
    base |= dict(zip(flags[::2], flags[1::2]))
    assert cli(["edit", *[x for kv in base.items() for x in kv], "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "no-model" not in err


def test_edit_with_several_images_and_the_reference_flags(tmp_path, monkeypatch, capsys):
    """`--image a --image b` edits with both references (a stand-in pipeline with KontextPipeline's sizes); the
    reference flags reach the pipeline; a missing second image, too many tokens or a model of one image: one
    line, exit 2 (a missing image before the model loads)."""
    from tests.test_batch import Kontext

    class Pipe(Kontext):
        default_steps, default_guidance = 2, 2.5

        def generate(self, prepared, prompts, seeds, *, guidance, steps):
            return self.edit(prepared, prompts, seeds, guidance, steps)

    loads = []

    def load(folder, dtype=None, auto_resize=True, **references):
        loads.append(references)
        pipe = Pipe(**{k.removeprefix("reference_"): v for k, v in references.items()})
        pipe.auto_resize = auto_resize
        return pipe

    monkeypatch.setattr("jaxedit.pipelines.auto.load_pipeline", load)
    write_png(tmp_path / "a.png", 64, 48)
    write_png(tmp_path / "b.png", 32, 32)
    out = tmp_path / "out.png"
    base = ["edit", "--image", str(tmp_path / "a.png"), "--prompt", "x", "--out", str(out), "--keep-size"]
    assert cli(base + ["--image", str(tmp_path / "b.png"), "--reference-ids", "index"]) == 0
    assert Image.open(out).size == (64, 48) and loads == [{"reference_ids": "index"}]
    assert cli(base + ["--image", str(tmp_path / "nope.png")]) == 2 and len(loads) == 1
    assert "image not found" in capsys.readouterr().err.splitlines()[-1]
    assert cli(base + ["--image", str(tmp_path / "b.png"), "--max-tokens", "20"]) == 2
    assert "36 image tokens, over the maximum of 20" in capsys.readouterr().err  # community: b at a's size
    own = ["--reference-ids", "community-own-sizes", "--max-tokens", "20"]
    assert cli(base + ["--image", str(tmp_path / "b.png"), *own]) == 2
    assert "28 image tokens, over the maximum of 20" in capsys.readouterr().err  # b at its own 32x32
    monkeypatch.setattr(Pipe, "several_references", False)
    assert cli(base + ["--image", str(tmp_path / "b.png")]) == 2
    assert "--image: this model takes one input image, got 2" in capsys.readouterr().err
