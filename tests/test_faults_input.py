"""Bad input stops a command in one line naming the file, key or field, exit code 2, before any work (#23):
malformed safetensors files and shards, mistyped or out-of-range `--set` overrides, unknown presets, and a
torn last line of a run's metrics.jsonl (cut off on restart, not fatal)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from checkpoints_convert.__main__ import main as convert_cli

# ------------------------------------------------------------------------------------------------
# malformed safetensors files: 8-byte little-endian header length N, N bytes of JSON, then the data

GOOD = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
}


def safetensors_bytes(header, data: bytes = bytes(32), length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def with_entry(name: str, **entry) -> dict:
    return GOOD | {name: GOOD[name] | entry}


BAD_FILES = {
    "empty file": b"",
    "shorter than the header length": b"\x10\x00\x00",
    "truncated data": safetensors_bytes(GOOD, bytes(20)),
    "truncated header": safetensors_bytes(GOOD, b"", length=4000),
    "header length 2**62": safetensors_bytes(GOOD, length=2**62),
    "header not JSON": safetensors_bytes(b"{nope", b""),
    "header not UTF-8": safetensors_bytes(b'{"\xff": 1}', b""),
    "header a JSON list": safetensors_bytes([1, 2], b""),
    "entry without data_offsets": safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "bad dtype string": safetensors_bytes(with_entry("b", dtype="F99")),
    "shape not a list of sizes": safetensors_bytes(with_entry("a", shape=[2, -3])),
    "shape x itemsize != span": safetensors_bytes(with_entry("a", shape=[2, 4])),
    "overlapping offsets": safetensors_bytes(with_entry("b", data_offsets=[16, 24]), bytes(24)),
    "out-of-range offsets": safetensors_bytes(with_entry("b", data_offsets=[4000, 4008])),
    "a gap between tensors": safetensors_bytes(with_entry("b", data_offsets=[26, 34]), bytes(34)),
    "bytes after the last tensor": safetensors_bytes(GOOD, bytes(40)),
}


def one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    for name in names:
        assert name in err, err
    return err


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_malformed_safetensors_file_fails_in_one_line_naming_it(tmp_path, capsys, case):
    """Checked from the header at open by our reader: the safetensors library's errors name no file, and which
    corruptions it finds at open (not at the first read) depends on its version."""
    f = tmp_path / "broken.safetensors"
    f.write_bytes(BAD_FILES[case])
    assert convert_cli(["check", str(f), "--preset", "flux-kontext-tiny"]) == 2
    one_line_error(capsys, str(f))
    dst = tmp_path / "out"
    assert convert_cli(["transformer", str(f), str(dst), "--preset", "flux-kontext-tiny"]) == 2
    one_line_error(capsys, str(f))
    assert not dst.exists()


def sharded(folder: Path, second: bytes, weight_map: dict | None = None) -> Path:
    folder.mkdir()
    (folder / "model-1.safetensors").write_bytes(safetensors_bytes({"a": GOOD["a"]}, bytes(24)))
    (folder / "model-2.safetensors").write_bytes(second)
    weight_map = weight_map or {"a": "model-1.safetensors", "b": "model-2.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_a_broken_shard_of_an_index_is_named_with_its_index(tmp_path, capsys):
    good_b = safetensors_bytes({"b": GOOD["b"] | {"data_offsets": [0, 8]}}, bytes(8))
    for i, (second, weight_map, what) in enumerate(
        [
            (good_b[:-3], None, "run past the file"),
            (safetensors_bytes(b"not json", b""), None, "JSON"),
            (good_b, {"a": "model-1.safetensors", "b": "model-2.safetensors", "c": "model-2.safetensors"}, "c"),
        ]
    ):
        folder = sharded(tmp_path / str(i), second, weight_map)
        assert convert_cli(["check", str(folder), "--preset", "flux-kontext-tiny"]) == 2
        one_line_error(capsys, "model-2.safetensors", "model.safetensors.index.json", what)
    for i, index in enumerate([[1], {"weight_map": ["model-1.safetensors"]}, {"weight_map": {"a": 3}}]):
        folder = sharded(tmp_path / f"index{i}", good_b)
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        assert convert_cli(["check", str(folder), "--preset", "flux-kontext-tiny"]) == 2
        one_line_error(capsys, "model.safetensors.index.json")


def test_pipeline_stops_on_a_broken_file_before_replacing_anything(tmp_path, capsys):
    src, dst = tmp_path / "release", tmp_path / "model"
    src.mkdir()
    (src / "flux1-kontext-tiny.safetensors").write_bytes(BAD_FILES["truncated data"])
    dst.mkdir()
    (dst / "keep.txt").write_text("old model folder")
    args = ["pipeline", str(src), str(dst), "--preset", "flux-kontext-tiny", "--force"]
    assert convert_cli(args) == 2
    one_line_error(capsys, "flux1-kontext-tiny.safetensors")
    assert (dst / "keep.txt").read_text() == "old model folder"
