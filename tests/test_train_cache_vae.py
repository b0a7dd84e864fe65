"""`python -m train.precompute` caches exactly what the inline encoders feed the train step; the
VAE training stage learns, resumes deterministically, and its decoder-only mode keeps the latents."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxedit import model_folder
from jaxedit.checkpoint import load_params
from jaxedit.kontext.encoder import KontextEncoder
from jaxedit.train.data import Cache, DataConfig, EditBatches, index_manifest
from jaxedit.train.precompute import precompute
from jaxedit.train.vae import VAETrainConfig, batch_at, load_images, train_vae
from tests.test_train_data import write_dataset
from tests.tiny_train import cached_like_encoder, random_model_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = write_dataset(root / "data", n_square=6, n_wide=4, bad=False, n_multi=3)  # (sources of 2 buckets)
    return random_model_folder(root / "model"), data


def test_cached_batches_equal_the_inline_encoder(tiny, tmp_path):
    model, data = tiny
    cfg = DataConfig(path=str(data), batch_size=2, pixel_budget=64 * 64, bucket_step=16, num_threads=1)
    precompute(model, cfg, tmp_path / "cache", batch=3)  # other batch sizes than training's
    index = index_manifest(cfg)
    plain = EditBatches(cfg, index, 0, 1)
    cached = EditBatches(dataclasses.replace(cfg, cache=str(tmp_path / "cache")), index, 0, 1)
    preset = model_folder.read_description(model)
    parts = {p: load_params(model / p) for p in ("vae", "t5", "clip")}
    encoder = KontextEncoder(model, preset, parts, vae_sample=False)
    buckets, several = cached_like_encoder(plain, cached, encoder)
    assert len(buckets) == 2 and several == 1  # square and wide buckets, and the items of two sources, cached
    txt, y = encoder.text.encode([""])
    np.testing.assert_array_equal(cached.cache.empty[0], np.asarray(txt[0], np.float32))
    # a cache made for other items is refused, naming itself
    other = write_dataset(tmp_path / "other", n_square=3, n_wide=0, bad=False)
    with pytest.raises(ValueError, match="cache"):
        Cache(tmp_path / "cache", index_manifest(dataclasses.replace(cfg, path=str(other))))


def test_a_cache_is_refused_once_its_vae_changed(tiny, tmp_path):
    """The cache records what computed it (by content); a model folder whose VAE was retrained since, or
    whose latent shift/scale moved, no longer matches it, and the error names the part."""
    import shutil

    from jaxedit.train.vae import write_vae

    src, data = tiny
    model = tmp_path / "model"
    shutil.copytree(src, model)  # a copy is the same model: same contents
    cfg = DataConfig(path=str(data), batch_size=2, pixel_budget=64 * 64, bucket_step=16, num_threads=1)
    precompute(src, cfg, tmp_path / "cache", batch=8)
    index = index_manifest(cfg)
    cached = dataclasses.replace(cfg, cache=str(tmp_path / "cache"))
    assert EditBatches(cached, index, 0, 1, model=model).cache is not None
    vae = load_params(model / "vae")
    scale = model_folder.read_description(model).vae.scale_factor
    write_vae(model, jax.tree.map(lambda a: a * 1.01, vae), 0.0, scale)  # as train_vae ends
    with pytest.raises(ValueError, match=r"with other vae than model folder"):
        EditBatches(cached, index, 0, 1, model=model)
    write_vae(model, vae, 0.5, scale)  # the same weights, another latent shift: still another VAE
    with pytest.raises(ValueError, match=r"with other vae than model folder"):
        EditBatches(cached, index, 0, 1, model=model)


@pytest.mark.slow  # over a minute on the 2-core CI machine
def test_vae_stage_learns_resumes_and_decoder_only_keeps_latents(tiny, tmp_path):
    model, data = tiny
    folder = tmp_path / "model"
    import shutil

    shutil.copytree(model, folder)
    cfg = VAETrainConfig(
        model=str(folder),
        data=DataConfig(path=str(data), pixel_budget=64 * 64, bucket_step=16),
        init="folder",
        steps=6,
        batch_size=4,
        crop=16,
        lr=3e-3,
        warmup_steps=1,
        max_images=8,
        stats_images=8,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every=3,
        log_every=1,
    )
    images = load_images(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data))))
    assert images.shape == (8, 64, 64, 3)
    np.testing.assert_array_equal(batch_at(images, cfg, 4), batch_at(images, cfg, 4))  # a function of (seed, step)
    assert not np.array_equal(batch_at(images, cfg, 4), batch_at(images, cfg, 5))

    before = load_params(folder / "vae")
    train_vae(cfg)
    m = [json.loads(x) for x in (tmp_path / "ckpt-metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == list(range(1, 7)) and m[-1]["mse"] < m[0]["mse"]
    desc = json.loads((folder / "jaxedit.json").read_text())["config"]["vae"]
    assert desc["shift_factor"] != model_folder.read_description(model).vae.shift_factor  # re-measured

    # decoder only: encoder bit-exact, shift/scale kept, decoder changed
    trained = load_params(folder / "vae")
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trained)))
    dec = dataclasses.replace(cfg, decoder_only=True, checkpoint_dir=str(tmp_path / "dec"), steps=3)
    train_vae(dec)
    after = load_params(folder / "vae")
    for a, b in zip(jax.tree.leaves(trained["encoder"]), jax.tree.leaves(after["encoder"])):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained["decoder"]), jax.tree.leaves(after["decoder"]))
    )
    assert json.loads((folder / "jaxedit.json").read_text())["config"]["vae"] == desc
