"""Packed datasets (`jaxedit.data`): pack from a folder, Parquet and webdataset tar shards (bad rows recorded and
skipped), info and verify (a corrupted shard named in one line), the shard reader's batches against the folder
reader's, per-process shares, resume from a saved iterator state, a killed pack resumed, memory:// paths."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from jaxedit.data import command, reader, records, sources
from jaxedit.data.pack import pack
from jaxedit.train.data import DataConfig, EditBatches, index_manifest, load_image
from jaxedit.train.loop import check_data, data_iterator
from tests.test_train_data import write_dataset

SMALL = {"pixel_budget": 64 * 64, "bucket_step": 16}


def png(w: int, h: int, seed: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def packed_folder(tmp_path: Path, bad: bool = False, shard_size: int = 5, **kw) -> tuple[Path, Path]:
    data = write_dataset(tmp_path / "data", bad=bad, n_multi=4, **kw)
    out = tmp_path / "packed"
    pack(sources.FolderSource(str(data), shard_size=shard_size), str(out), workers=2)
    return data, out


def test_pack_a_folder_records_bad_rows_and_info_verify_name_a_corrupted_shard(tmp_path, capsys):
    data, out = packed_folder(tmp_path, bad=True)
    index = records.read_index(str(out))
    assert index["examples"] == 20 and index["rows"] == 25 and index["max_sources"] == 2
    # the folder reader's reasons; the truncated image it only finds when decoding is a bad row here
    assert index["bad_rows"] == {"source/target sizes differ": 1, "empty instruction": 1, "unreadable image": 1,
                                 "image does not decode": 1, "bad manifest line": 1}  # fmt: skip
    bad = [json.loads(x) for x in (out / records.BAD_ROWS).read_text().splitlines()]
    assert [b["where"].rsplit(":", 1)[1] for b in bad] == ["21", "22", "23", "24", "25"]
    assert "truncated" not in {r.id for r in map(records.decode, all_records(out))}
    assert command.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    # 5 tasks of 5 lines; the last one's lines are all bad: no shard
    assert "20 examples in 4 shards" in text and "shards/00003.array_record" in text and "00004" not in text
    assert command.main(["verify", str(out)]) == 0 and "checksums match" in capsys.readouterr().out

    shard = out / "shards" / "00002.array_record"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert command.main(["verify", str(out)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: shard {out}/shards/00002.array_record: sha256 ") and "does not match" in line
    check_data(DataConfig(path=str(out)))  # same size: only data.verify (or `jaxedit data verify`) sees it
    with pytest.raises(ValueError, match="00002.array_record: sha256"):
        check_data(DataConfig(path=str(out), verify=True))
    shard.write_bytes(bytes(raw[:-10]))  # truncated: caught by its size before a run's first step
    with pytest.raises(ValueError, match=r"shard .*00002.array_record: \d+ bytes, the index says"):
        check_data(DataConfig(path=str(out)))


def all_records(out: Path) -> list[bytes]:
    index = records.read_index(str(out))
    import grain

    src = grain.sources.ArrayRecordDataSource(reader.shard_paths(str(out), index))
    return [src[i] for i in range(len(src))]


def test_shard_reader_gives_the_folder_readers_batches(tmp_path):
    """Same data, same seed: the same ids in the same batches and the same pixels, for 1 and 2 processes."""
    data, out = packed_folder(tmp_path)
    for p_count in (1, 2):
        for p in range(p_count):
            cfg = DataConfig(path=str(data), batch_size=2, seed=3, **SMALL)
            folder = EditBatches(cfg, index_manifest(cfg), p, p_count)
            cfg = DataConfig(path=str(out), batch_size=2, seed=3, **SMALL)
            shards = reader.ShardBatches(
                cfg, reader.index_records(cfg), reader.shard_paths(str(out), records.read_index(str(out))), p, p_count
            )
            assert shards.per_epoch == folder.per_epoch == 10
            for i in range(shards.per_epoch * 2):
                a, b = folder(i), shards(i)
                assert a.keys() == b.keys() and a["id"] == b["id"] and a["instruction"] == b["instruction"]
                for k in ("source", "source_1", "target"):
                    if k in a:
                        np.testing.assert_array_equal(a[k], b[k])
    # loop.data_iterator picks the reader by the index file
    _, batches = data_iterator(DataConfig(path=str(out), batch_size=2, **SMALL), epochs=1)
    assert isinstance(batches, reader.ShardBatches)
    _, batches = data_iterator(DataConfig(path=str(data), batch_size=2, **SMALL), epochs=1)
    assert not isinstance(batches, reader.ShardBatches)
    # items of two sources are left out for a model that takes one (counted)
    assert dict(reader.index_records(cfg, max_sources=1).skipped) == {"too many sources": 4}


def test_processes_read_disjoint_shares_covering_each_epoch_and_resume_exactly(tmp_path):
    _, out = packed_folder(tmp_path)
    cfg = DataConfig(path=str(out), batch_size=4, seed=1, num_threads=1, **SMALL)
    its = [reader.make_iterator(cfg, epochs=2, process_index=p, process_count=2)[0] for p in range(2)]
    per_epoch = reader.make_iterator(cfg, epochs=1, process_index=0, process_count=1)[1].per_epoch
    for _ in range(2):
        shares = [[i for _ in range(per_epoch) for i in next(it)["id"]] for it in its]
        assert not set(shares[0]) & set(shares[1])
        assert len(shares[0]) == len(shares[1]) == per_epoch * 2
        assert len(set(shares[0] + shares[1])) == per_epoch * 4  # every full batch's items, once each

    it, _ = reader.make_iterator(cfg, process_index=1, process_count=2)
    for _ in range(3):  # mid-epoch (4 batches an epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # (as the checkpoint stores it)
    expected = [next(it) for _ in range(4)]
    again, _ = reader.make_iterator(cfg, process_index=1, process_count=2)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert got["id"] == want["id"]
        np.testing.assert_array_equal(got["target"], want["target"])


def write_parquet(url: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)


def test_pack_parquet_through_memory_filesystem_and_read_it_back(tmp_path):
    """Parquet shards in memory:// (two sources, one as HF image structs), packed into memory://, read through
    local copies of the shards: the images are the input's bytes."""
    pytest.importorskip("pyarrow")
    rows = [{"src": png(40, 24, i), "ref": {"bytes": png(24, 40, 10 + i), "path": None}, "tgt": png(40, 24, 20 + i),
             "prompt": f"edit {i}", "key": f"k{i}"} for i in range(5)]  # fmt: skip
    rows[1]["tgt"] = b"not an image"
    rows[3]["prompt"] = ""
    rows[4]["ref"] = None
    write_parquet("memory://in/a-00000.parquet", rows[:3])
    write_parquet("memory://in/a-00001.parquet", rows[3:] + [rows[0] | {"key": "k5"}])
    write_parquet("memory://in/b-00000.parquet", [{"src": png(32, 32, 1), "prompt": "no target"}])
    try:
        source = sources.ParquetSource(("memory://in/",), ("src", "ref"), "tgt", "prompt", "key")
        summary = pack(source, "memory://packed", workers=2)
        assert (summary.rows, summary.examples, summary.shards) == (7, 3, 2)
        assert summary.bad_rows == {"image does not decode": 1, "empty instruction": 1, "missing image": 1,
                                    "missing column": 1}  # fmt: skip
        assert command.main(["verify", "memory://packed"]) == 0
        cfg = DataConfig(path="memory://packed", batch_size=1, copies=str(tmp_path / "copies"), **SMALL)
        it, batches = reader.make_iterator(cfg, epochs=1, process_index=0, process_count=1)
        got = {b["id"][0]: b for b in it}
        assert sorted(got) == ["k0", "k2", "k5"] and len(list((tmp_path / "copies").rglob("*.array_record"))) == 2
        (w, h), (w1, h1) = (batches.index.buckets[i] for i in batches.index.items[0].group[1])
        np.testing.assert_array_equal(got["k2"]["source"][0], load_image(io.BytesIO(rows[2]["src"]), (w, h)))
        np.testing.assert_array_equal(
            got["k2"]["source_1"][0], load_image(io.BytesIO(rows[2]["ref"]["bytes"]), (w1, h1))
        )
        assert got["k2"]["instruction"] == ["edit 2"]
    finally:
        fsspec.filesystem("memory").rm("/", recursive=True)


def test_a_parquet_copy_of_a_folder_dataset_reads_as_the_folder(tmp_path):
    """The same pairs kept as a folder and as Parquet rows (image bytes in columns), each packed: the shard
    readers give the folder reader's batches (ids, instructions, pixels) for the same seed, so a run trains on the
    same examples in the same order, to the same losses, whichever form the data came in."""
    pytest.importorskip("pyarrow")
    data = write_dataset(tmp_path / "data", bad=False)
    text = (data / "manifest.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in text if x.startswith("{")]  # (its last line is a bad one: not JSON)
    rows = [{"src": (data / x["source"]).read_bytes(), "tgt": (data / x["target"]).read_bytes(),
             "prompt": x["instruction"], "key": x["id"]} for x in lines]  # fmt: skip
    (tmp_path / "pq").mkdir()
    write_parquet(str(tmp_path / "pq" / "part-00000.parquet"), rows[:9])
    write_parquet(str(tmp_path / "pq" / "part-00001.parquet"), rows[9:])
    out_folder, out_parquet = tmp_path / "from_folder", tmp_path / "from_parquet"
    pack(sources.FolderSource(str(data), shard_size=5), str(out_folder), workers=2)
    pack(sources.ParquetSource((str(tmp_path / "pq"),), ("src",), "tgt", "prompt", "key"), str(out_parquet),
         workers=2)  # fmt: skip
    cfg = DataConfig(path=str(data), batch_size=2, seed=5, **SMALL)
    folder = EditBatches(cfg, index_manifest(cfg), 0, 1)
    for out in (out_folder, out_parquet):
        cfg = DataConfig(path=str(out), batch_size=2, seed=5, **SMALL)
        shards = reader.ShardBatches(
            cfg, reader.index_records(cfg), reader.shard_paths(str(out), records.read_index(str(out))), 0, 1
        )
        assert shards.per_epoch == folder.per_epoch == 8
        for i in range(2 * shards.per_epoch):
            a, b = folder(i), shards(i)
            assert a["id"] == b["id"] and a["instruction"] == b["instruction"], (out.name, i)
            for k in ("source", "target"):
                np.testing.assert_array_equal(a[k], b[k])


def test_a_parquet_input_without_pyarrow_fails_in_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"")
    assert command.main(["pack", "--from", "parquet", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: reading Parquet needs pyarrow: pip install 'jaxedit[data]'\n"
    # and the library, its data package and the command import without pyarrow
    code = "import sys; sys.modules['pyarrow'] = None; import jaxedit.cli, jaxedit.data.command, jaxedit.train.loop"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_pack_webdataset_tar_shards(tmp_path):
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "000.tar", "w") as tar:
        add(tar, "a/0001.src.png", png(48, 32, 1))
        add(tar, "a/0001.tgt.png", png(48, 32, 2))
        add(tar, "a/0001.txt", b"make it blue")
        add(tar, "a/0002.src.png", png(32, 32, 3))
        add(tar, "a/0002.src_1.jpg", png(16, 48, 4))  # (the format is found from the bytes)
        add(tar, "a/0002.target.png", png(32, 32, 5))
        add(tar, "a/0002.json", json.dumps({"instruction": "combine", "id": "two"}).encode())
        add(tar, "a/0003.src.png", png(32, 32, 6))
        add(tar, "a/0003.txt", b"no target")
    with tarfile.open(tmp_path / "tars" / "001.tar", "w") as tar:
        add(tar, "0004.src.png", png(32, 32, 7))
        add(tar, "0004.tgt.png", png(32, 32, 8))
        add(tar, "0004.txt", b"\xff not utf-8")
    out = tmp_path / "packed"
    assert command.main(["pack", "--from", "tar", str(tmp_path / "tars"), "--out", str(out), "--workers", "2"]) == 0
    index = records.read_index(str(out))
    assert index["examples"] == 2 and index["bad_rows"] == {"missing image": 1, "bad instruction": 1}
    got = {ex.id: ex for ex in map(records.decode, all_records(out))}
    assert sorted(got) == ["a/0001", "two"]
    assert got["two"].sizes == ((32, 32), (16, 48), (32, 32)) and got["two"].instruction == "combine"
    assert got["a/0001"].sources == (png(48, 32, 1),)


def test_a_killed_pack_resumes_where_it_stopped(tmp_path):
    data = write_dataset(tmp_path / "data", bad=True)
    done = []

    class Dying(sources.FolderSource):
        def rows(self, task):
            done.append(task[0])
            if task[0] == 8 and len(done) < 4:
                raise KeyboardInterrupt("killed")  # (as a kill would, mid-way through a shard)
            yield from super().rows(task)

    out = tmp_path / "packed"
    with pytest.raises(KeyboardInterrupt):
        pack(Dying(str(data), shard_size=4), str(out), workers=1)
    assert not (out / records.INDEX).exists() and sorted((out / "progress").glob("0*.json"))
    assert not (out / "shards" / "00002.array_record").exists()  # the shard being written is not left behind
    before, finished = list(done), len(list((out / "progress").glob("0*.json")))
    summary = pack(Dying(str(data), shard_size=4), str(out), workers=1)
    again = done[len(before) :]
    assert before[:3] == [0, 4, 8] and 0 not in again and 4 not in again and again[0] == 8
    # (one thread: the task queued after the killed one may have run before the pool stopped)
    assert summary.resumed == finished >= 2 and len(again) == 6 - finished
    assert sorted((set(before) - {8}) | set(again)) == [0, 4, 8, 12, 16, 20]
    ref = tmp_path / "ref"
    pack(sources.FolderSource(str(data), shard_size=4), str(ref), workers=3)
    a, b = records.read_index(str(out)), records.read_index(str(ref))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert (a["examples"], a["bad_rows"]) == (b["examples"], b["bad_rows"])


def test_two_jax_processes_read_disjoint_shares_and_resume(tmp_path):
    """A real 2-process jax.distributed run (localhost): each process's share comes from jax.process_index;
    the shares are disjoint and cover each epoch's full batches; each resumes its own share from its state."""
    from tests.test_multiprocess import free_port

    _, out = packed_folder(tmp_path)
    port, n = free_port(), 8  # 2 epochs of 4 batches of 4 (10 + 6 + 4 items in 3 groups)
    procs = []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("data_worker.py")), str(out),
                                       str(tmp_path / f"p{pid}.json"), str(n)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    for p in procs:
        try:
            log = p.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a data process hung")
        assert p.returncode == 0, log[-3000:]
    a, b = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
    cfg = DataConfig(path=str(out), batch_size=4, seed=2, **SMALL)
    it, one = reader.make_iterator(cfg, process_index=0, process_count=1)
    assert one.per_epoch == 4
    for i in range(n):
        assert len(a["ids"][i]) == len(b["ids"][i]) == 2 and a["ids"][i] + b["ids"][i] == next(it)["id"]
    for e in range(2):
        epoch = [x for r in (a, b) for batch in r["ids"][4 * e : 4 * e + 4] for x in batch]
        assert len(epoch) == len(set(epoch)) == 16
    assert a["resumed"] == a["ids"][n // 2 :] and b["resumed"] == b["ids"][n // 2 :]


@pytest.mark.slow  # two tiny training runs and a restart: minutes on the 2-core CI machine
def test_training_from_packed_shards_matches_the_folder_and_resumes_after_a_kill(tmp_path):
    """`python -m train` with data.path = a packed folder dataset logs the folder run's losses exactly (same seed,
    same examples in the same order); killed after step 5 and restarted, it reproduces them."""
    from tests.tiny_train import ROOT, command, env, kill_at_step, losses, random_model_folder

    model = random_model_folder(tmp_path / "model")
    data = write_dataset(tmp_path / "data", n_square=12, n_wide=0, bad=False)
    packed = tmp_path / "packed"
    pack(sources.FolderSource(str(data), shard_size=5), str(packed))
    cache = tmp_path / "xla"
    run = lambda d, ckpt: subprocess.run(  # noqa: E731
        command(model, d, ckpt), env=env(cache), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    for d, ckpt in ((data, tmp_path / "folder"), (packed, tmp_path / "shards")):
        r = run(d, ckpt)
        assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(tmp_path / "folder")
    assert sorted(ref) == list(range(1, 9)) and losses(tmp_path / "shards") == ref

    ckpt = tmp_path / "killed"
    kill_at_step(command(model, packed, ckpt), env(cache), 5, timeout=300)
    again = run(packed, ckpt)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step" in again.stdout and losses(ckpt) == ref


def test_a_checkpoint_dir_url_is_refused_in_one_line_not_written_to_a_local_gs_folder():
    from jaxedit import presets
    from jaxedit.train.config import TrainConfig
    from jaxedit.train.loop import check_config

    with pytest.raises(ValueError, match=r"^checkpoint_dir gs://b/run: URLs are not supported yet"):
        check_config(TrainConfig(checkpoint_dir="gs://b/run"), presets.get("flux-kontext-tiny"))


def test_index_records_arrays_match_per_example_planning(tmp_path):
    """The shard reader's index is arrays (no object per example); its items and epochs are those of bucketing each
    example in Python and planning from per-group lists (what the reader did before: same batches, same seed)."""
    from jaxedit.train.data import make_buckets, nearest_bucket

    rng = np.random.default_rng(0)
    sizes = rng.integers(16, 2000, (3000, 3, 2)).astype(np.int32)
    sizes[:, 1:][rng.random((3000, 2)) < 0.4] = 0  # absent sources, gaps too
    buf = io.BytesIO()
    np.save(buf, sizes)
    (tmp_path / records.SIZES).write_bytes(buf.getvalue())
    cfg = DataConfig(path=str(tmp_path), batch_size=4, pixel_budget=256 * 256, bucket_step=64, seed=5)
    buckets = make_buckets(cfg.pixel_budget, cfg.bucket_step, cfg.max_aspect)
    want = []  # (record, group)
    for k, row in enumerate(sizes.tolist()):
        srcs = [s for s in row[1:] if s[0] > 0]
        if len(srcs) <= 1:
            want.append((k, (nearest_bucket(buckets, *row[0]), tuple(nearest_bucket(buckets, *s) for s in srcs))))
    index = reader.index_records(cfg, max_sources=1)
    assert isinstance(index.items, reader.RecordItems) and index.group_of.dtype == np.int32
    assert [(it.record, it.group) for it in index.items] == want
    by_group = {}
    for i, (_, g) in enumerate(want):
        by_group.setdefault(g, []).append(i)
    batches = EditBatches(cfg, index, 0, 1)
    for epoch in (0, 1):
        gen, planned = np.random.default_rng([cfg.seed, epoch]), []
        for g in sorted(by_group):
            perm = gen.permutation(by_group[g])
            planned += [list(map(int, c)) for c in perm[: len(perm) // 4 * 4].reshape(-1, 4)]
        planned = [planned[i] for i in gen.permutation(len(planned))]
        assert batches.plan(epoch).tolist() == planned
