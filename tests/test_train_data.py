"""The grain training-data pipeline: buckets, bad samples, determinism, host slices, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from jaxedit.train.data import DataConfig, EditBatches, index_manifest, load_image, make_buckets, make_iterator


def write_dataset(
    root: Path, n_square: int = 10, n_wide: int = 6, bad: bool = True, seed: int = 0, n_multi: int = 0
) -> Path:
    """PNG pairs (64x64 and 96x48) + manifest.jsonl; with `bad`, one item of each failure kind; `n_multi` items
    of two sources (square item i's source, then the first wide source) and square item i's target."""
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
    for i in range(n_multi):
        s, t, wide = lines[i]["source"], lines[i]["target"], lines[n_square]["source"]
        lines.append({"sources": [s, wide], "target": t, "instruction": f"two sources {i}", "id": f"multi{i}"})
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


def test_items_of_several_sources_batch_by_the_buckets_of_each(tmp_path):
    """ "sources" lines: each source in its own bucket (it need not match the target), batched with the items of
    the same buckets as "source", "source_1" in order; a missing second source or "source" with "sources" skips
    the line (besides the dataset's "not json" line); max_sources=1 (Step1X-Edit) skips items of two."""
    root = write_dataset(tmp_path, n_square=4, n_wide=2, bad=False, n_multi=4)
    with open(root / "manifest.jsonl", "a") as f:
        for extra in ({"sources": ["img/0_src.png", "img/nope.png"]}, {"source": "img/0_src.png", "sources": []}):
            f.write(json.dumps(extra | {"target": "img/0_tgt.png", "instruction": "x"}) + "\n")
    cfg = DataConfig(path=str(root), batch_size=2, pixel_budget=64 * 64, bucket_step=16)
    index = index_manifest(cfg)
    assert len(index.items) == 10 and dict(index.skipped) == {"unreadable image": 1, "bad manifest line": 2}
    assert "nope.png" in " ".join(index.skipped_lines)
    square, wide = index.items[0].bucket, index.items[4].bucket
    assert {it.group for it in index.items} == {(square, (square,)), (wide, (wide,)), (square, (square, wide))}
    ds, seen = EditBatches(cfg, index, 0, 1), set()
    for i in range(ds.per_epoch):
        b = ds(i)
        if b["id"][0].startswith("multi"):
            assert set(b) >= {"source", "source_1", "target"}
            (w, h), (ww, wh) = index.buckets[square], index.buckets[wide]
            assert b["source"].shape == b["target"].shape == (2, h, w, 3) and b["source_1"].shape == (2, wh, ww, 3)
            np.testing.assert_array_equal(b["source_1"][0], load_image(root / "img/4_src.png", (ww, wh)))
            seen.update(b["id"])
        else:
            assert "source_1" not in b
    assert seen == {f"multi{i}" for i in range(4)}
    assert dict(index_manifest(cfg, max_sources=1).skipped) == {"too many sources": 5, "bad manifest line": 2}
