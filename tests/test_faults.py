"""Nothing lost, nothing silently wrong (issue #23): a damaged model folder is named at load instead of
loaded; a conversion or an export killed at any point leaves what was there loadable and a rerun completes;
`--force` deletes nothing before the new folder is complete, and never a folder that is not a model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from checkpoints_convert.__main__ import main as convert_cli
from jaxedit import DEFAULT_MODEL, model_folder
from jaxedit.checkpoint import CHECKSUMS, load_params
from jaxedit.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def biggest_data_file(part: Path) -> Path:
    return max((f for f in part.rglob("*") if f.is_file() and f.parent.name == "d"), key=lambda f: f.stat().st_size)


def flip_byte(f: Path) -> None:
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x40
    f.write_bytes(bytes(b))


def unseal(d: Path, part: str) -> None:
    (d / part / CHECKSUMS).unlink()


def damage(d: Path, case: str) -> None:
    if case == "flipped byte":
        flip_byte(biggest_data_file(d / "transformer"))
    elif case == "truncated file":
        f = biggest_data_file(d / "vae")
        f.write_bytes(f.read_bytes()[:100])
    elif case == "deleted metadata":
        (d / "t5" / "_METADATA").unlink()
    elif case == "deleted metadata, no checksums":
        unseal(d, "t5")
        (d / "t5" / "_METADATA").unlink()
    elif case == "truncated file, no checksums":
        unseal(d, "vae")
        f = biggest_data_file(d / "vae")
        f.write_bytes(f.read_bytes()[:100])
    elif case == "transformer copied in as vae":
        shutil.rmtree(d / "vae")
        shutil.copytree(d / "transformer", d / "vae")
    elif case == "wrong type in jaxedit.json":
        desc = json.loads((d / "jaxedit.json").read_text())
        desc["config"]["transformer"]["depth"] = "2"
        (d / "jaxedit.json").write_text(json.dumps(desc))
    elif case == "damaged tokenizer":
        flip_byte(max((d / "tokenizer").iterdir(), key=lambda f: f.stat().st_size if f.name != CHECKSUMS else 0))


DAMAGE = {
    "flipped byte": r"transformer: file ocdbt.process_0/d/\w+ is damaged: contents changed since it was written",
    "truncated file": r"vae: file ocdbt.process_0/d/\w+ is damaged: 100 bytes where \d+ were written",
    "deleted metadata": r"t5: file _METADATA is damaged: missing",
    "deleted metadata, no checksums": r"t5: cannot read this checkpoint's metadata",
    "truncated file, no checksums": r"vae: cannot read this checkpoint's arrays",
    "transformer copied in as vae": r"vae: not the vae this folder's jaxedit.json describes: parameters \d+ missing",
    "wrong type in jaxedit.json": r"jaxedit.json: transformer config: depth is an integer, got '2'",
    "damaged tokenizer": r"tokenizer: file \S+ is damaged: contents changed",
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_model_folder_is_named_in_one_line_not_loaded(case, tmp_path, capsys):
    """Each part is verified against the checksums written with it (and against the shapes its description
    implies) before it is used: one line naming the part and file, exit 2, nothing written."""
    d = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    damage(d, case)
    Image.new("RGB", (64, 64), "white").save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as e:
        cli(["edit", "--model", str(d), "--image", str(tmp_path / "in.png"), "--prompt", "x", "--out", str(out)])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("note: ")]
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert re.search(DAMAGE[case], err[0]), err[0]
    assert not out.exists()


def test_shipped_default_model_is_sealed_and_verifies():
    from jaxedit.checkpoint import verify

    for sub in model_folder.SUBFOLDERS:
        if (DEFAULT_MODEL / sub).is_dir():
            assert verify(DEFAULT_MODEL / sub), sub


def run_killed(point: str, *args: str) -> None:
    """`python -m tests.kill_at POINT ARGS`: must die by SIGKILL at that point."""
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "tests.kill_at", point, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == -9, p.stdout + p.stderr[-2000:]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_an_export_killed_mid_write_loses_nothing(tmp_path):
    """`export_model` replaces transformer/ (model_folder.write_part, as every checkpoint write): killed
    while writing the new copy, the folder still loads the old weights (complete and verified), the partial
    copy is cleared, and the next write completes. (A cut between its renames: the conversion test below.)"""
    d = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    preset = model_folder.read_description(d)
    before = np.asarray(load_params(d / "vae")["decoder"]["conv_in"]["kernel"])
    run_killed("unsealed", "write_part", str(d), "vae")
    assert (d / ".vae.new").is_dir()
    parts = model_folder.load_parts(d, preset)
    np.testing.assert_array_equal(np.asarray(parts["vae"]["decoder"]["conv_in"]["kernel"]), before)
    assert not [p for p in d.iterdir() if p.name.startswith(".vae.")]
    model_folder.write_part(d, "vae", jax.tree.map(lambda a: a + 1, parts["vae"]))
    got = model_folder.load_parts(d, preset)["vae"]["decoder"]["conv_in"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got), before + 1)


@pytest.fixture(scope="module")
def release(tiny_kontext):
    """A tiny diffusers-layout FLUX.1 Kontext release on disk (random weights, written by diffusers), and
    the model folder converted from it."""
    return tiny_kontext[1].parent / "diffusers", tiny_kontext[1]


def convert(src: Path, dst: Path, *extra: str) -> int:
    return convert_cli(["pipeline", str(src), str(dst), "--preset", "flux-kontext-tiny", *extra])


def test_force_deletes_nothing_before_the_new_folder_is_complete(release, tmp_path, capsys):
    """A source that fails a check done inside the conversion (a fixed buffer with other values) leaves the
    model folder it was to replace untouched; --force refuses a folder that is not a model folder; an
    unwritable destination fails in a second."""
    from safetensors.numpy import load_file, save_file

    release, converted = release
    dst = tmp_path / "model"
    shutil.copytree(converted, dst)
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    f = next((bad / "text_encoder").glob("*.safetensors"))
    tensors = load_file(str(f))
    tensors["embeddings.position_ids"] = np.zeros((1, 77), np.int64)  # arange(77) expected
    save_file(tensors, str(f))
    capsys.readouterr()
    assert convert(bad, dst, "--force") == 2
    assert "position_ids does not hold the expected values" in capsys.readouterr().err
    model_folder.load_parts(dst, model_folder.read_description(dst))  # still complete and verified
    assert leftovers(dst) == []

    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"jpeg")
    assert convert(release, other, "--force") == 2
    assert "is not a jaxedit model folder: --force replaces only" in capsys.readouterr().err
    assert (other / "holiday.jpg").read_bytes() == b"jpeg"

    for unwritable in (Path("/proc/1/jaxedit-model"), tmp_path / "photos" / "holiday.jpg" / "model"):
        t0 = time.perf_counter()
        assert convert(release, unwritable) == 2
        assert time.perf_counter() - t0 < 5
        err = capsys.readouterr().err
        assert f"cannot write beside {unwritable}" in err and len(err.strip().splitlines()) == 1, err


def test_a_conversion_killed_at_any_point_leaves_the_old_folder_and_reruns(release, tmp_path):
    """Killed between the final renames (the old folder moved aside, the new one not yet in place): the
    complete new folder loads (the next use finishes the swap), and the same command then completes with
    nothing left beside it. (Killed while writing: the export test above; the conversion writes only into
    .DST.new until then.)"""
    release, converted = release
    dst = tmp_path / "model"
    shutil.copytree(converted, dst)
    preset = model_folder.read_description(dst)
    converted = load_params(dst / "vae")
    model_folder.write_part(dst, "vae", jax.tree.map(lambda a: a + 1, converted))  # unlike a fresh conversion
    kernel = lambda: np.asarray(model_folder.load_parts(dst, preset)["vae"]["decoder"]["conv_in"]["kernel"])  # noqa: E731
    command = ["checkpoints_convert", "pipeline", str(release), str(dst), "--preset", "flux-kontext-tiny", "--force"]
    run_killed("swap", *command)
    # (.model.lock: the killed conversion's lock file, free since it died; the next conversion removes it)
    assert not dst.exists() and leftovers(dst) == [".model.lock", ".model.new", ".model.old"]
    np.testing.assert_array_equal(kernel(), np.asarray(converted["decoder"]["conv_in"]["kernel"]))
    assert leftovers(dst) == [".model.lock"]
    assert convert(release, dst, "--force") == 0
    assert leftovers(dst) == []


# issue #35, item 4
@pytest.mark.parametrize("case", ["truncated file", "NaN values", "transformer copied in as vae"])
def test_seal_loads_an_unsealed_part_first_and_refuses_damage(case, tmp_path, capsys):
    """`jaxedit-convert seal` vouches for what it seals: an unsealed part whose files were damaged, whose values
    are not finite, or that is another part is named in one line and left unsealed; a sound one is sealed."""
    d = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    if case == "NaN values":
        vae = load_params(d / "vae")
        kernel = np.array(vae["decoder"]["conv_in"]["kernel"])
        kernel[0, 0, 0, 0] = np.nan
        vae["decoder"]["conv_in"]["kernel"] = kernel
        model_folder.write_part(d, "vae", vae)
        words = "parameter decoder/conv_in/kernel holds NaN or inf: not sealed"
    elif case == "transformer copied in as vae":
        shutil.rmtree(d / "vae")
        shutil.copytree(d / "transformer", d / "vae")
        words = "not the vae this folder's jaxedit.json describes"
    else:
        f = biggest_data_file(d / "vae")
        f.write_bytes(f.read_bytes()[:100])
        words = "cannot read this checkpoint's arrays"
    unseal(d, "vae")
    assert convert_cli(["seal", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and str(d / "vae") in err and "Traceback" not in err, err
    assert not (d / "vae" / CHECKSUMS).exists()
    shutil.rmtree(d / "vae")
    shutil.copytree(DEFAULT_MODEL / "vae", d / "vae")
    unseal(d, "vae")
    assert convert_cli(["seal", str(d)]) == 0 and (d / "vae" / CHECKSUMS).is_file()


# issue #35, item 9
def test_quantize_copies_links_as_links_and_never_follows_one(tmp_path, capsys):
    """A `loop -> .` link in the source was followed 40 levels deep (483 MB for a 13 MB model, then a
    traceback and the partial copy left); a link leading out of the folder is refused before any work; DST a
    link to SRC with --force is refused, nothing deleted through it."""
    src = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, src)
    (tmp_path / "secret.txt").write_text("not the model's")
    (src / "notes").mkdir()
    (src / "notes" / "secret").symlink_to(tmp_path / "secret.txt")
    dst = tmp_path / "int8"
    assert convert_cli(["quantize", str(src), str(dst), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes/secret is a link to" in err and "outside" in err, err
    assert not dst.exists() and leftovers(dst) == []

    (src / "notes" / "secret").unlink()
    (src / "loop").symlink_to(".")
    assert convert_cli(["quantize", str(src), str(dst), "--quantize", "int8"]) == 0
    assert (dst / "loop").is_symlink() and os.readlink(dst / "loop") == "."
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file() and not f.is_symlink() and "loop" not in
               f.relative_to(dst).parts)  # fmt: skip
    assert size < 3 * sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    capsys.readouterr()

    link = tmp_path / "link"
    link.symlink_to(src)
    assert convert_cli(["quantize", str(src), str(link), "--quantize", "int8", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "write the quantised copy to another folder" in err, err
    assert link.is_symlink() and (src / "jaxedit.json").is_file() and leftovers(link) == []


def test_replacing_a_link_removes_the_link_not_what_it_names(tmp_path):
    from jaxedit.checkpoint import replace_dir

    target, new, dst = tmp_path / "target", tmp_path / ".dst.new", tmp_path / "dst"
    target.mkdir()
    (target / "keep").write_text("x")
    new.mkdir()
    dst.symlink_to(target)
    replace_dir(new, dst)
    assert dst.is_dir() and not dst.is_symlink() and (target / "keep").read_text() == "x"
    assert not (tmp_path / ".dst.old").exists() and not (tmp_path / ".dst.old").is_symlink()
