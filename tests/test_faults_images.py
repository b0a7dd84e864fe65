"""Photos as they are displayed (#35 item 3): the EXIF orientation is applied wherever an image file is read,
as diffusers' `load_image` does, and results of versions that ignored it are not trusted on resume."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from PIL import Image, ImageOps

from jaxedit.pipelines.batch import file_digest, image_size, item_key, load_image, parse_item, run_job
from tests.test_faults_batch import DEFAULTS, Pipeline


def rotated_photo(path, orientation: int = 6):
    """A 128x64 (w x h) PNG whose EXIF says: turn it 90 degrees (displayed 64x128)."""
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(path, exif=exif)
    return path


def test_an_exif_rotated_photo_is_read_upright_everywhere(tmp_path):
    photo = rotated_photo(tmp_path / "photo.png")
    with Image.open(photo) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert want.shape == (128, 64, 3)
    assert image_size(str(photo)) == (64, 128)  # from the header, as the buckets are made
    np.testing.assert_array_equal(np.asarray(load_image(str(photo))), want)  # edit, batch, references

    # a batch (the stand-in's edit is its input): written upright, 64x128
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "p", "image": "photo.png", "prompt": "x"}) + "\n")
    assert run_job(Pipeline(), tmp_path / "m.jsonl", tmp_path / "out", defaults=DEFAULTS, progress=False)["ok"] == 1
    assert Image.open(tmp_path / "out" / "p.png").size == (64, 128)

    # training and precompute: indexed by the displayed size, decoded upright
    from jaxedit.train.data import DataConfig, index_manifest
    from jaxedit.train.data import load_image as load_training_image

    (tmp_path / "manifest.jsonl").write_text(json.dumps({"source": "photo.png", "target": "photo.png",
                                                         "instruction": "x"}) + "\n")  # fmt: skip
    index = index_manifest(DataConfig(path=str(tmp_path), pixel_budget=64 * 128, bucket_step=16))
    assert len(index.items) == 1 and index.buckets[index.items[0].bucket] == (64, 128)
    got = load_training_image(photo, (64, 128))
    np.testing.assert_allclose(got, want.astype(np.float32) / 127.5 - 1.0, atol=1e-6)


def test_resume_does_not_trust_a_result_made_sideways(tmp_path):
    """A rotated photo's result recorded by a version that ignored the orientation (its key: the bytes only) is
    redone; an unrotated image keeps its key (nothing reruns for it)."""
    photo = rotated_photo(tmp_path / "photo.png")
    item = parse_item({"id": "p", "image": "photo.png", "prompt": "x"}, 1, DEFAULTS, tmp_path)
    old = [item.prompt, item.seed, item.steps, item.guidance, item.width, item.height, file_digest(str(photo)), "m"]
    assert item_key(item, "m") != hashlib.sha256(json.dumps(old).encode()).hexdigest()[:16]
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 16)).save(plain)
    item = parse_item({"id": "q", "image": "plain.png", "prompt": "x"}, 1, DEFAULTS, tmp_path)
    old = [item.prompt, item.seed, item.steps, item.guidance, item.width, item.height, file_digest(str(plain)), "m"]
    assert item_key(item, "m") == hashlib.sha256(json.dumps(old).encode()).hexdigest()[:16]
