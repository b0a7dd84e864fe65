"""The encoder cache of a packed dataset as record shards (`jaxedit.data.cache`, `jaxedit.data.encode`): cached
batches equal the inline encoder's on the tiny Kontext model, two processes' shares make the same shards as one,
the cache is refused once its model parts, dataset or bucket settings changed, and training from it logs the
uncached run's losses."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import jax
import numpy as np
import pytest

from jaxedit import model_folder
from jaxedit.checkpoint import load_params
from jaxedit.data import cache, encode, reader, records, sources
from jaxedit.data.pack import pack
from jaxedit.kontext.encoder import KontextEncoder
from jaxedit.train.data import CACHED_PARTS, DataConfig
from jaxedit.train.loop import check_data
from jaxedit.train.precompute import precompute
from tests.test_train_data import write_dataset
from tests.tiny_train import cached_like_encoder, random_model_folder

SMALL = {"pixel_budget": 64 * 64, "bucket_step": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shardcache")
    data = write_dataset(root / "data", n_square=6, n_wide=4, bad=False, n_multi=3)  # (sources of 2 buckets)
    packed = root / "packed"
    pack(sources.FolderSource(str(data), shard_size=5), str(packed), workers=1)
    return random_model_folder(root / "model"), packed


def batches_of(cfg: DataConfig, model=None) -> reader.ShardBatches:
    index = records.read_index(cfg.path)
    shards = records.shard_paths(cfg.path, index)
    return reader.ShardBatches(cfg, reader.index_records(cfg), shards, 0, 1, model, index)


def test_cached_shards_equal_the_inline_encoder_and_two_shares_make_the_same_shards(tiny, tmp_path):
    model, packed = tiny
    cfg = DataConfig(path=str(packed), batch_size=2, num_threads=1, **SMALL)
    out = tmp_path / "cache"
    meta = precompute(model, cfg, out, batch=3, shard_size=4)  # other batch sizes than training's, padded
    index = cache.read_index(str(out))
    assert index["examples"] == 13 and [s["records"] for s in index["shards"]] == [4, 4, 4, 1]
    assert meta["index"] == index and index["identity"]["parts"] == model_folder.digest(model, CACHED_PARTS)

    preset = model_folder.read_description(model)
    parts = {p: load_params(model / p) for p in ("vae", "t5", "clip")}
    encoder = KontextEncoder(model, preset, parts, vae_sample=False)
    plain = batches_of(cfg)
    cached = batches_of(dataclasses.replace(cfg, cache=str(out)), model)
    assert plain.per_epoch == cached.per_epoch
    shapes, several = cached_like_encoder(plain, cached, encoder)
    assert len(shapes) == 2 and several >= 1  # square and wide buckets, and items of two sources, cached
    txt, y = encoder.text.encode([""])
    np.testing.assert_array_equal(cached.cache.empty[0], np.asarray(txt[0], np.float32))
    np.testing.assert_array_equal(cached.cache.empty[1], np.asarray(y[0], np.float32))

    # two processes, each its share (process 1 first: process 0 writes the index once every share is there)
    two = tmp_path / "two"
    empty = {"txt": np.asarray(txt[0], np.float32), "y": np.asarray(y[0], np.float32)}
    identity = index["identity"]
    enc = lambda host: encoder(host, jax.random.key(0))  # noqa: E731
    assert encode.write(str(two), cfg, enc, empty, identity, 3, 4, process_index=1, process_count=2) is None
    assert not (two / records.INDEX).exists() and sorted(p.name for p in (two / "shards").iterdir()) == [
        "00002.array_record",
        "00003.array_record",
    ]
    index2 = encode.write(str(two), cfg, enc, empty, identity, 3, 4, process_index=0, process_count=2)
    assert [s["sha256"] for s in index2["shards"]] == [s["sha256"] for s in index["shards"]]
    # run again: every shard is there, nothing is re-encoded
    again = encode.write(str(two), cfg, lambda host: 1 / 0, empty, identity, 3, 4)
    assert again["shards"] == index2["shards"]
    check_data(dataclasses.replace(cfg, cache=str(two)))


def test_a_sharded_cache_is_refused_once_its_model_dataset_or_settings_changed(tiny, tmp_path):
    from jaxedit.train.vae import write_vae

    src, packed = tiny
    model = tmp_path / "model"
    shutil.copytree(src, model)
    cfg = DataConfig(path=str(packed), batch_size=2, num_threads=1, cache=str(tmp_path / "cache"), **SMALL)
    precompute(src, cfg, tmp_path / "cache", batch=8, shard_size=8)
    assert batches_of(cfg, model).cache is not None  # a copy of the model folder is the same model
    with pytest.raises(ValueError, match="bucket settings"):
        check_data(dataclasses.replace(cfg, bucket_step=32))
    vae = load_params(model / "vae")
    write_vae(model, jax.tree.map(lambda a: a * 1.01, vae), 0.0, model_folder.read_description(model).vae.scale_factor)
    with pytest.raises(ValueError, match=r"with other vae than model folder"):
        batches_of(cfg, model)
    other = tmp_path / "other"
    pack(sources.FolderSource(str(write_dataset(tmp_path / "d2", n_square=4, n_wide=0, bad=False)), 5), str(other))
    with pytest.raises(ValueError, match=r"computed from other shards than data.path"):
        check_data(dataclasses.replace(cfg, path=str(other)))
    with pytest.raises(FileNotFoundError, match="no index.json"):
        check_data(dataclasses.replace(cfg, cache=str(tmp_path / "nothing")))


@pytest.mark.slow  # two tiny training runs: minutes on the 2-core CI machine
def test_training_from_the_sharded_cache_logs_the_uncached_losses(tiny, tmp_path):
    from tests.tiny_train import ROOT, command, env, losses

    model, packed = tiny
    cfg = DataConfig(path=str(packed), **SMALL)
    precompute(model, cfg, tmp_path / "cache", batch=4, shard_size=5)
    xla = tmp_path / "xla"
    for name, sets in (("plain", ()), ("cached", (f"data.cache={tmp_path / 'cache'}",))):
        r = subprocess.run(command(model, packed, tmp_path / name, *sets), env=env(xla), cwd=ROOT,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    plain, cached = losses(tmp_path / "plain"), losses(tmp_path / "cached")
    assert sorted(plain) == list(range(1, 9)) and sorted(cached) == sorted(plain)
    np.testing.assert_allclose([cached[s] for s in plain], list(plain.values()), rtol=2e-3)
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["examples"] == 13
