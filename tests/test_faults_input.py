"""Bad input stops a command in one line naming the file, key or field, exit code 2, before any work (#23):
malformed safetensors files and shards, mistyped or out-of-range `--set` overrides, unknown presets, and a
torn last line of a run's metrics.jsonl (cut off on restart, not fatal)."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest

from checkpoints_convert.__main__ import main as convert_cli
from jaxedit.cli import main as jaxedit_cli
from jaxedit.plan import main as plan_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

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
    (dst / "jaxedit.json").write_text('{"format": "jaxedit-model", "version": 1}')  # --force may replace it
    (dst / "keep.txt").write_text("old model folder")
    args = ["pipeline", str(src), str(dst), "--preset", "flux-kontext-tiny", "--force"]
    assert convert_cli(args) == 2
    one_line_error(capsys, "flux1-kontext-tiny.safetensors")
    assert (dst / "keep.txt").read_text() == "old model folder"


# ------------------------------------------------------------------------------------------------
# `--set` overrides: checked against the config dataclasses' field types and ranges before any work


def nowhere(tmp_path) -> list[str]:
    """Overrides that make a run fail at once if a bad value got through (no model, no data)."""
    return [f"--set=model={tmp_path / 'none'}", f"--set=data.path={tmp_path / 'none'}",
            f"--set=checkpoint_dir={tmp_path / 'ckpt'}"]  # fmt: skip


@pytest.mark.parametrize(
    "bad, names",
    [
        ("steps=abc", ["steps", "integer", "'abc'"]),
        ("steps=2.5", ["steps", "integer", "2.5"]),
        ("steps=true", ["steps", "integer"]),
        ("steps=0", ["steps", ">= 1"]),
        ("data.batch_size=0", ["data.batch_size", ">= 1"]),
        ("data=5", ["data", "DataConfig"]),
        ("data=null", ["data", "DataConfig"]),
        ("checkpoint_every=0", ["checkpoint_every", ">= 1"]),
        ("log_every=0", ["log_every", ">= 1"]),
        ("keep=0", ["keep", ">= 1"]),
        ("grad_accum=0", ["grad_accum", ">= 1"]),
        ("sample_every=-1", ["sample_every", ">= 0"]),
        ("optim.lr=fast", ["optim.lr", "number"]),
        ("optim.lr=-1e-4", ["optim.lr", "> 0"]),
        ("optim.b2=1.5", ["optim.b2", "[0, 1)"]),
        ("optim.clip_norm=0", ["optim.clip_norm", "> 0"]),
        ("objective.prompt_dropout=2", ["prompt_dropout"]),
        ("objective.guidance=[1, 2, 3]", ["objective.guidance"]),
        ("lora.rank=4", ["lora", "lora={}"]),
        ('lora={"rank": 0}', ["lora", "rank", ">= 1"]),
        ('lora={"rank": 2.5}', ["rank", "integer"]),
        ("nope=1", ["nope", "TrainConfig"]),
        ("steps", ["steps", "KEY=VALUE"]),
    ],
)
def test_a_bad_override_fails_in_one_line_naming_the_field(tmp_path, capsys, bad, names):
    assert jaxedit_cli(["train", "--config", str(CONFIGS / "kontext_tiny.py"), *nowhere(tmp_path), "--set", bad]) == 2
    one_line_error(capsys, *names)


@pytest.mark.parametrize("bad", ["crop=abc", "batch_size=0", "data=5", "checkpoint_every=0", "lr=0"])
def test_a_bad_vae_override_fails_in_one_line(tmp_path, capsys, bad):
    assert jaxedit_cli(["train", "--config", str(CONFIGS / "shapes_vae.py"), *nowhere(tmp_path), "--set", bad]) == 2
    one_line_error(capsys, bad.partition("=")[0])


def test_a_run_that_cannot_start_fails_in_one_line(tmp_path, capsys):
    """The model folder and the settings against it are checked before any work, not after the model is loaded."""
    from jaxedit import DEFAULT_MODEL

    model = f"--set=model={DEFAULT_MODEL}"
    for config, more, names in [
        ("kontext_tiny.py", [], ["none", "not a jaxedit model folder"]),
        ("shapes_vae.py", [], ["none", "not a jaxedit model folder"]),
        ("kontext_tiny.py", [model, "--set=data.batch_size=3"], ["batch_size 3", "grad_accum"]),
        ("kontext_tiny.py", [model, "--set=mesh=fsdp=x"], ["mesh", "'x'"]),
        ("kontext_tiny.py", [model, "--set=remat=most"], ["remat", "'most'"]),
        ("shapes_vae.py", [model, "--set=crop=13"], ["crop 13"]),
    ]:
        assert jaxedit_cli(["train", "--config", str(CONFIGS / config), *nowhere(tmp_path), *more]) == 2
        one_line_error(capsys, *names)


def test_good_overrides_take_the_field_type():
    from jaxedit.train.config import load_config
    from jaxedit.train.lora import LoraConfig

    cfg = load_config(
        CONFIGS / "kontext_tiny.py",
        ["model=2024", "optim.lr=1", "objective.guidance=[1, 4]", 'lora={"rank": 4}', "optim.ema_decay=None"],
    )
    assert cfg.model == "2024" and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.objective.guidance == (1.0, 4.0) and cfg.lora == LoraConfig(rank=4) and cfg.optim.ema_decay is None
    assert load_config(CONFIGS / "kontext_tiny.py", ["lora={}", "lora.rank=8"]).lora == LoraConfig(rank=8)


def test_every_shipped_config_passes_the_checks():
    from jaxedit.train.config import load_config

    for path in sorted(CONFIGS.glob("*.py")):
        load_config(path)


# ------------------------------------------------------------------------------------------------
# unknown presets


def test_an_unknown_preset_fails_in_one_line_listing_the_known_ones(tmp_path, capsys):
    f = tmp_path / "x.safetensors"
    f.write_bytes(safetensors_bytes(GOOD))
    assert convert_cli(["check", str(f), "--preset", "flux-kontext-nope"]) == 2
    one_line_error(capsys, "flux-kontext-nope", "flux-kontext-tiny", "step1x-edit")
    for cli in (lambda a: jaxedit_cli(["plan", *a]), plan_cli):
        assert cli(["--preset", "flux-kontext-nope", "--task", "train"]) == 2  # before jax's device count matters
        one_line_error(capsys, "flux-kontext-nope", "flux-kontext-tiny", "step1x-edit")


# ------------------------------------------------------------------------------------------------
# a torn last line of metrics.jsonl (a kill mid-write) is cut off when the run restarts


def test_a_torn_last_metrics_line_is_cut_off_on_restart(tmp_path, caplog):
    from jaxedit.train.monitor import Monitor

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        m = Monitor(tmp_path, total_steps=10, batch_size=4, start_step=2, lead=True, tb=False)
    assert [r.getMessage() for r in caplog.records if str(path) in r.getMessage()], caplog.text
    m.log(3, {"loss": 0.25})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 0.25
