"""Model folders: the description must name its family, parts are replaced atomically, and restoring a
checkpoint into a given target honours the requested dtype."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import model_folder, presets
from jaxedit.checkpoint import load_params, param_metadata, save_params


def test_a_description_without_a_family_is_refused():
    d = model_folder.preset_to_dict(presets.get("flux-kontext-tiny"))
    model_folder.preset_from_dict(d)
    del d["family"]
    with pytest.raises(ValueError, match="field 'family' is None; expected one of flux-kontext, flux, step1x-edit"):
        model_folder.preset_from_dict(d, "x/jaxedit.json")


def test_write_part_replaces_atomically_and_recovers_a_cut_swap(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    old, new = {"w": np.zeros((2, 3), np.float32)}, {"w": np.ones((2, 3), np.float32)}
    model_folder.write_part(folder, "vae", old)
    model_folder.write_part(folder, "vae", new)
    np.testing.assert_array_equal(load_params(folder / "vae")["w"], new["w"])
    assert sorted(p.name for p in folder.iterdir()) == ["vae"]  # nothing left beside it
    # a swap cut after the old part was moved aside and before the new one was renamed in
    save_params(folder / ".vae.new", old)
    (folder / "vae").rename(folder / ".vae.old")
    preset = presets.get("flux-kontext-tiny")
    with pytest.raises(FileNotFoundError, match="missing transformer, t5, clip"):  # vae is recovered, not missing
        model_folder.check_complete(folder, preset)
    np.testing.assert_array_equal(load_params(folder / "vae")["w"], old["w"])  # the complete new copy won
    assert sorted(p.name for p in folder.iterdir()) == ["vae"]
    # a later write after another cut swap first puts the complete copy back, then replaces it
    save_params(folder / ".vae.new", new)
    (folder / "vae").rename(folder / ".vae.old")
    model_folder.write_part(folder, "vae", new)
    np.testing.assert_array_equal(load_params(folder / "vae")["w"], new["w"])
    assert sorted(p.name for p in folder.iterdir()) == ["vae"]


def test_load_params_into_a_target_honours_dtype(tmp_path):
    save_params(tmp_path / "p", {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), param_metadata(tmp_path / "p")
    )
    got = load_params(tmp_path / "p", target, dtype=jnp.bfloat16)
    assert got["a"].dtype == jnp.bfloat16 and got["a"].sharding == dev
    np.testing.assert_array_equal(np.asarray(got["a"], np.float32), np.arange(6).reshape(2, 3))


def test_description_is_written_atomically(tmp_path):
    preset = presets.get("flux-kontext-tiny")
    model_folder.write_description(tmp_path, preset, {"steps": 8})
    assert json.loads((tmp_path / "jaxedit.json").read_text())["pipeline"] == {"steps": 8}
    assert [p.name for p in tmp_path.iterdir()] == ["jaxedit.json"]


_OPENED: list[str] | None = None  # paths opened while a test counts them (`count_opens`)


def _count(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_count)  # (an audit hook cannot be removed: it counts only inside `count_opens`)


@contextlib.contextmanager
def count_opens():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def cli_args(*argv: str):
    from jaxedit.cli import model_options

    p = argparse.ArgumentParser()
    model_options(p)
    return p.parse_args(list(argv))


def test_loading_a_model_folder_reads_its_description_once():
    """`jaxedit edit` / `batch` (`cli.load_pipeline`, then the batch's `model_identity`) open jaxedit.json once:
    the `ModelFolder` value read from it is what the pipeline's load, `load_parts` and the fingerprint get."""
    from jaxedit import DEFAULT_MODEL
    from jaxedit.cli import load_pipeline, model_identity

    args = cli_args("--model", str(DEFAULT_MODEL))
    with count_opens() as opened:
        pipe = load_pipeline(args)
        model_identity(args, pipe)
    assert opened.count(os.path.realpath(DEFAULT_MODEL / "jaxedit.json")) == 1
    assert pipe.folder.path == DEFAULT_MODEL and pipe.folder.preset == pipe.preset


def test_loading_a_step1x_folder_reads_its_description_once(tmp_path, tiny_qwen):
    """The same for Step1X-Edit, whose Qwen2.5-VL section is read by the embedder's loading too."""
    from jaxedit.cli import load_pipeline
    from tests.tiny_step1x import make_tiny_step1x

    folder = make_tiny_step1x(tmp_path / "s1x", qwen_path=tiny_qwen[0], qwen_config=tiny_qwen[1])
    with count_opens() as opened:
        pipe = load_pipeline(cli_args("--model", str(folder)))
    assert opened.count(os.path.realpath(folder / "jaxedit.json")) == 1
    assert pipe.text_encoder is not None and pipe.folder.qwen["model"]


def test_a_model_folder_is_one_checked_value(tmp_path):
    preset = presets.get("flux-kontext-tiny")
    model_folder.write_description(tmp_path, preset, {"steps": 8}, extra={"quantized": {"transformer": "int8"}})
    opened = model_folder.ModelFolder.open(tmp_path)
    assert (opened.preset, opened.options, opened.quantized) == (preset, {"steps": 8}, {"transformer": "int8"})
    assert model_folder.ModelFolder.of(opened) is opened
    assert model_folder.fingerprint(opened) == model_folder.fingerprint(tmp_path)
    model_folder.write_description(tmp_path, preset, {"steps": 0})
    with pytest.raises(ValueError, match="jaxedit.json: pipeline.steps"):  # the command line's checks
        model_folder.ModelFolder.open(tmp_path)
