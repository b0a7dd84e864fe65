"""One line, not a traceback (#35 item 12): deeply nested safetensors headers, training settings checked before
any work, `plan`'s sizes, and two conversions into one destination."""

from __future__ import annotations

import fcntl
import struct
from pathlib import Path

import pytest

from checkpoints_convert.__main__ import main as convert_cli
from jaxedit import DEFAULT_MODEL
from jaxedit.cli import main as jaxedit_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def one_line(capsys, *words) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    return err


def test_a_deeply_nested_safetensors_header_is_one_line(tmp_path, capsys):
    """json.loads raised RecursionError (not a ValueError) on a header of 100,000 nested lists."""
    raw = b"[" * 100_000 + b"]" * 100_000
    f = tmp_path / "deep.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert convert_cli(["check", str(f), "--preset", "flux-kontext-tiny"]) == 2
    one_line(capsys, str(f), "nested too deeply")
    argv = ["edit", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    (tmp_path / "in.png").write_bytes((Path(__file__).parents[1] / "examples" / "shapes.png").read_bytes())
    with pytest.raises(SystemExit) as e:
        jaxedit_cli([*argv, "--lora", str(f)])
    assert e.value.code == 2
    one_line(capsys, "--lora", str(f), "nested too deeply")


@pytest.mark.parametrize(
    "override,words",
    [
        ("data.path={tmp}/nonexistent", ["data.path", "nonexistent", "no manifest"]),
        ("dtype=int4", ["dtype 'int4'", "bfloat16"]),
        ("attention=bogus", ["attention 'bogus'", "splash"]),
    ],
)
def test_training_settings_are_checked_before_any_work(override, words, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.jsonl").write_text("")
    base = [f"--set=model={DEFAULT_MODEL}", f"--set=data.path={tmp_path / 'data'}",
            f"--set=checkpoint_dir={tmp_path / 'ckpt'}"]  # fmt: skip
    argv = ["train", "--config", str(CONFIGS / "kontext_tiny.py"), *base, "--set", override.format(tmp=tmp_path)]
    assert jaxedit_cli(argv) == 2
    one_line(capsys, *words)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "flags,words", [(["--resolution", "-5"], "--resolution: -5 is not >= 16"), (["--batch", "0"], "--batch: 0 is not")]
)
def test_plan_refuses_sizes_below_one_instead_of_reading_them_as_the_default(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        jaxedit_cli(["plan", "--task", "sample", "--preset", "flux-kontext-tiny", *flags])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_a_second_conversion_into_one_destination_refuses_in_one_line(tmp_path, capsys):
    """The loser of two conversions into one folder ended in an Orbax/asyncio traceback; now the destination's
    lock file (beside it, while a conversion writes) names the writer and the second stops before any work. Once
    free, nothing is left beside the destination."""
    dst = tmp_path / "model"
    lock = tmp_path / ".model.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere, since 2026-01-01 00:00:00\n")
        held.flush()
        for argv in (["pipeline", str(tmp_path / "nope"), str(dst), "--preset", "flux-kontext-tiny"],
                     ["vae", str(tmp_path / "nope.safetensors"), str(dst), "--preset", "flux-kontext-tiny"],
                     ["quantize", str(tmp_path / "nope"), str(dst), "--quantize", "int8"]):  # fmt: skip
            assert convert_cli(argv) == 2
            one_line(capsys, f"{dst} is being written by another process (pid 4242 on elsewhere")
    lock.unlink()
    assert convert_cli(["pipeline", str(tmp_path / "nope"), str(dst), "--preset", "flux-kontext-tiny"]) == 2
    assert "being written" not in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == []
