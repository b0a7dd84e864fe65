"""Where results and compiled programs go (#35): an output folder that cannot be written is one line before the
model loads; an unusable compilation cache is a warning, not a failure."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from jaxedit.cli import main as cli


def one_line(capsys, *words) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


# item 10
def test_batch_and_precompute_check_their_output_folder_before_loading(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "in.png", "prompt": "x"}) + "\n")
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    no_model = str(tmp_path / "no-model")  # never reached: the output is checked first
    for out, words in ((a_file, ["is a file, not a folder"]), (a_file / "sub", ["cannot make a folder there"])):
        assert cli(["batch", "--manifest", str(manifest), "--out", str(out), "--model", no_model]) == 2
        assert "no-model" not in one_line(capsys, f"--out {out}", *words)
        assert cli(["precompute", "--model", no_model, "--data", str(tmp_path), "--out", str(out)]) == 2
        assert "no-model" not in one_line(capsys, f"--out {out}", *words)
    assert a_file.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder (the path-under-a-file case above "
                    "covers an unwritable output as root)")  # fmt: skip
def test_batch_refuses_a_read_only_output_folder_before_loading(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "in.png", "prompt": "x"}) + "\n")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    try:
        assert cli(["batch", "--manifest", str(manifest), "--out", str(locked / "out"), "--model", "nope"]) == 2
        one_line(capsys, "cannot write in", str(locked))
    finally:
        locked.chmod(0o700)


# item 11
@pytest.mark.parametrize("where", ["proc", "file", "under a file"])
def test_an_unusable_compile_cache_is_one_warning_and_the_run_goes_on(where, tmp_path, monkeypatch, capsys):
    from jaxedit.pipelines import base

    a_file = tmp_path / "cache-file"
    a_file.write_text("x")
    path = {"proc": "/proc/jaxedit-test/x", "file": str(a_file), "under a file": str(a_file / "xla")}[where]
    monkeypatch.setattr(base, "_CACHE_WARNED", set())
    monkeypatch.setenv("JAXEDIT_CACHE_DIR", path)
    assert base.enable_compilation_cache() is None
    assert base.enable_compilation_cache() is None
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "$JAXEDIT_CACHE_DIR" in err and path in err, err
    monkeypatch.delenv("JAXEDIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", path)
    assert base.enable_compilation_cache() is None
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "$XDG_CACHE_HOME" in err, err
