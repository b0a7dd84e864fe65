"""The grain training-data pipeline: buckets, bad samples, determinism, host slices, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from jaxedit.train.data import DataConfig, EditBatches, index_manifest, make_buckets, make_iterator


def write_dataset(root: Path, n_square: int = 10, n_wide: int = 6, bad: bool = True, seed: int = 0) -> Path:
    """PNG pairs (64x64 and 96x48) + manifest.jsonl; with `bad`, one item of each failure kind."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []

    def pair(i: int, w: int, h: int, tw: int | None = None) -> tuple[str, str]:
        a = rng.integers(0, 256, (h, w, 3), np.uint8)
        Image.fromarray(a).save(root / "img" / f"{i}_src.png")
        Image.fromarray(255 - a).resize((tw or w, h)).save(root / "img" / f"{i}_tgt.png")
        return f"img/{i}_src.png", f"img/{i}_tgt.png"

    for i in range(n_square + n_wide):
        s, t = pair(i, 64, 64) if i < n_square else pair(i, 96, 48)
        lines.append({"source": s, "target": t, "instruction": f"invert the colours {i}", "id": f"item{i}"})
    if bad:
        s, t = pair(100, 64, 64, tw=80)
        lines.append({"source": s, "target": t, "instruction": "sizes differ"})
        s, t = pair(101, 64, 64)
        lines.append({"source": s, "target": t, "instruction": "  "})
        lines.append({"source": "img/missing.png", "target": t, "instruction": "missing file"})
        s, t = pair(102, 64, 64)
        data = (root / s).read_bytes()
        (root / s).write_bytes(data[: len(data) // 2])  # header readable, decoding fails
        lines.append({"source": s, "target": t, "instruction": "truncated", "id": "truncated"})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    return root


def test_buckets_are_multiples_of_16_within_budget():
    buckets = make_buckets(512 * 512, 64, 3.0)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 512 * 512 and 1 / 3 <= w / h <= 3


def test_bad_samples_are_skipped_and_counted(tmp_path):
    cfg = DataConfig(path=str(write_dataset(tmp_path)), batch_size=4, pixel_budget=64 * 64, bucket_step=16, seed=1)
    index = index_manifest(cfg)
    assert dict(index.skipped) == {
        "source/target sizes differ": 1,
        "empty instruction": 1,
        "unreadable image": 1,
        "bad manifest line": 1,
    }
    assert len(index.items) == 17  # 16 good + the truncated one (only its header was read)
    ds = EditBatches(cfg, index, 0, 1)
    seen, n_bad = [], 0
    for i in range(ds.per_epoch * 2):
        b = ds(i)
        n_bad += b["n_bad"]
        assert b["source"].shape == b["target"].shape and b["source"].dtype == np.float32
        h, w = b["source"].shape[1:3]
        assert (w, h) in ((64, 64), (96, 32)) or (w, h) in index.buckets
        assert -1 <= b["source"].min() and b["source"].max() <= 1
        np.testing.assert_allclose(b["target"], -b["source"], atol=0.02)  # target = inverted source
        seen += b["id"]
    assert "truncated" not in seen
    assert n_bad >= 1


def test_order_is_deterministic_and_hosts_split_the_batch(tmp_path):
    cfg = DataConfig(path=str(write_dataset(tmp_path, bad=False)), batch_size=4, pixel_budget=64 * 64, bucket_step=16)
    index = index_manifest(cfg)
    one = EditBatches(cfg, index, 0, 1)
    ids = [one(i)["id"] for i in range(one.per_epoch * 2)]
    assert [EditBatches(cfg, index, 0, 1)(i)["id"] for i in range(len(ids))] == ids
    other = EditBatches(DataConfig(**{**cfg.__dict__, "seed": 5}), index, 0, 1)
    assert [other(i)["id"] for i in range(len(ids))] != ids
    assert ids[: one.per_epoch] != ids[one.per_epoch :]  # epochs are reshuffled
    h0, h1 = EditBatches(cfg, index, 0, 2), EditBatches(cfg, index, 1, 2)
    for i in range(len(ids)):
        assert h0(i)["id"] + h1(i)["id"] == ids[i]


def test_iterator_state_restores_the_continuation(tmp_path):
    cfg = DataConfig(path=str(write_dataset(tmp_path, bad=False)), batch_size=2, pixel_budget=64 * 64, bucket_step=16)
    it, _ = make_iterator(cfg)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it)["id"] for _ in range(6)]
    it2, _ = make_iterator(cfg)
    it2.set_state(json.loads(json.dumps(state)))
    assert [next(it2)["id"] for _ in range(6)] == expected


def manifest_with(root: Path, bad: bytes) -> DataConfig:
    """Two good pairs around one `bad` manifest line (line 2)."""
    (root / "img").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(root / "img" / f"{i}.png")
    good = [json.dumps({"source": f"img/{i}.png", "target": f"img/{i}.png", "instruction": f"x{i}"}).encode()
            for i in range(2)]  # fmt: skip
    (root / "manifest.jsonl").write_bytes(b"\n".join([good[0], bad, good[1]]) + b"\n")
    return DataConfig(path=str(root), batch_size=1, pixel_budget=64 * 64, bucket_step=16)


def test_a_non_utf8_manifest_line_is_skipped_alone_and_named_by_its_line(tmp_path):
    bad = b'{"source": "img/0.png", "target": "img/0.png", "instruction": "caf\xe9"}'
    index = index_manifest(manifest_with(tmp_path, bad))
    assert [it.instruction for it in index.items] == ["x0", "x1"] and [it.id for it in index.items] == ["0", "2"]
    assert dict(index.skipped) == {"bad manifest line": 1}
    (line,) = index.skipped_lines
    assert line.startswith(f"{tmp_path / 'manifest.jsonl'}:2: not UTF-8") and "0xe9" in line


def test_an_instruction_that_is_not_a_string_is_refused_not_trained_on_as_its_repr(tmp_path):
    bad = json.dumps({"source": "img/0.png", "target": "img/0.png", "instruction": ["a", "list"]}).encode()
    index = index_manifest(manifest_with(tmp_path, bad))
    assert [it.instruction for it in index.items] == ["x0", "x1"]
    assert dict(index.skipped) == {"bad instruction": 1}
    (line,) = index.skipped_lines
    assert line == f"{tmp_path / 'manifest.jsonl'}:2: field 'instruction' must be a string, got list"
