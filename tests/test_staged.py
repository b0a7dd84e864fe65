"""`jaxedit.staged`: a file or folder replaced in one rename, the old one intact until then, nothing left beside
it after a failure."""

from __future__ import annotations

import pytest

from jaxedit.staged import staged_dir, staged_file, write_file


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "a.json"
    write_file(path, "old")
    with pytest.raises(RuntimeError), staged_file(path, sync=True) as tmp:
        tmp.write_text("half")
        assert path.read_text() == "old" and tmp.parent == tmp_path and tmp.name.startswith(".a.json.")
        raise RuntimeError
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    write_file(path, b"new", sync=True)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "old").write_text("x")
    with pytest.raises(RuntimeError), staged_dir(dst) as new:
        (new / "new").write_text("y")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", "old"]
    (tmp_path / ".d.new").mkdir()  # a leftover of a killed writer is emptied first
    (tmp_path / ".d.new" / "stale").write_text("z")
    with staged_dir(dst) as new:
        assert not any(new.iterdir())
        (new / "new").write_text("y")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", "new"]
