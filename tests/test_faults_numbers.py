"""Nothing silently wrong (#35): non-finite numbers are refused at load (LoRA factors, a folder's numbers) or fail
their item (a decoded result), a model folder's options get the command line's checks, and its LoRAs stay
inside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from jaxedit import DEFAULT_MODEL, presets
from jaxedit.cli import main as cli
from jaxedit.kontext.pipeline import to_pil
from jaxedit.lora import LoraError, read_lora
from jaxedit.pipelines.batch import run_job
from jaxedit.step1x.pipeline import to_pil_truncated
from tests.test_faults_batch import DEFAULTS, latest, write_job

PRESET = presets.get("flux-kontext-tiny")
QKV = "lora_unet_double_blocks_0_img_attn_qkv"  # tiny: hidden 48, qkv [144, 48]


def kohya(down, up, alpha=None) -> dict:
    d = {f"{QKV}.lora_down.weight": np.asarray(down, np.float32), f"{QKV}.lora_up.weight": np.asarray(up, np.float32)}
    return d | ({} if alpha is None else {f"{QKV}.alpha": np.array(alpha, np.float32)})


def factors(r=2, down=0.1, up=0.1):
    return np.full((r, 48), down, np.float32), np.full((144, r), up, np.float32)


def with_value(a, v):
    a = a.copy()
    a.flat[5] = v
    return a


PEFT = {
    f"transformer.x_embedder.lora_{x}.weight": np.full(s, 0.1, np.float32) for x, s in (("A", (2, 64)), ("B", (48, 2)))
}
NONFINITE_LORAS = {  # name: (tensors, header metadata, what the error says besides file and key)
    "NaN in down": (kohya(with_value(factors()[0], np.nan), factors()[1]), None, "down factor holds NaN or inf"),
    "inf in up": (kohya(factors()[0], with_value(factors()[1], np.inf)), None, "up factor holds NaN or inf"),
    "3e38 overflows float32": (kohya(*factors(up=3e38, down=1.0)), None, "beyond float32's range"),
    "NaN alpha key": (kohya(*factors(), alpha=np.nan), None, "one finite number"),
    "NaN PEFT lora_alpha": (PEFT, {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": float("nan"),
                                                                        "transformer.r": 2})},
                            "transformer.lora_alpha is nan, not a finite number"),
    "rank 0 with an alpha": (kohya(np.zeros((0, 48)), np.zeros((144, 0)), alpha=4.0), None, "rank 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NONFINITE_LORAS))
def test_a_lora_with_nonfinite_or_overflowing_numbers_is_refused_at_read(case, tmp_path, capsys):
    tensors, meta, message = NONFINITE_LORAS[case]
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(LoraError) as e:
        read_lora(path, PRESET)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    # the command line: one line, exit 2, before the model loads (the folder is not even read)
    argv = ["edit", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    with pytest.raises(SystemExit) as exit_:
        cli([*argv, "--lora", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_a_nonfinite_decoded_item_fails_alone_and_writes_no_png(tmp_path):
    """The decode's check (`to_pil`, `to_pil_truncated`): an item with a NaN or inf value makes no image (it used
    to be an all-black PNG recorded ok); in a batch it fails alone, its batch-mates are written."""
    from jaxedit.pipelines.batch import NonFiniteError

    good = np.zeros((2, 16, 32, 3), np.float32)
    for convert in (to_pil, to_pil_truncated):
        assert [im.size for im in convert(good)] == [(32, 16)] * 2
        bad = good.copy()
        bad[1, 3, 4, 0] = np.nan
        with pytest.raises(NonFiniteError) as e:
            convert(bad)
        assert e.value.bad == [1] and e.value.images[1] is None and e.value.images[0].size == (32, 16)

    class Pipe:  # decodes a blank image per item; the one whose prompt says so overflows
        def bucket_for(self, size, width, height):
            return size

        def prepare(self, image, width, height):
            return type("P", (), {"bucket": image.size, "size": image.size})()

        def edit(self, prepared, prompts, seeds, guidance, steps):
            w, h = prepared[0].size
            x = np.zeros((len(prompts), h, w, 3), np.float32)
            x[[p == "overflow" for p in prompts]] = np.inf
            return to_pil(x)

    lines = [{"id": f"i{i}", "image": f"{i}.png", "prompt": "overflow" if i == 1 else "p"} for i in range(3)]
    manifest, out = write_job(tmp_path, lines, n=3)
    counts = run_job(Pipe(), manifest, out, batch_size=2, defaults=DEFAULTS, progress=False)
    assert counts == {"ok": 2, "failed": 1, "skipped": 0}
    r = latest(out)
    assert r["i1"]["status"] == "failed" and "NaN or inf" in r["i1"]["error"] and not (out / "i1.png").exists()
    assert (out / "i0.png").exists() and (out / "i2.png").exists()
    # a rerun retries the failed item only
    assert run_job(Pipe(), manifest, out, batch_size=2, defaults=DEFAULTS, progress=False)["skipped"] == 2


def model_folder(tmp_path: Path, pipeline=None, config=None, raw=None) -> Path:
    """A folder holding only the default model's jaxedit.json, its pipeline section and configs changed."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    d = json.loads((DEFAULT_MODEL / "jaxedit.json").read_text())
    if pipeline is not None:
        d["pipeline"] = pipeline if not isinstance(pipeline, dict) else d["pipeline"] | pipeline
    for part, fields in (config or {}).items():
        d["config"][part] |= fields
    (folder / "jaxedit.json").write_text(raw if raw is not None else json.dumps(d))
    return folder


BAD_OPTIONS = {  # name: (pipeline section changes, config changes, raw file, words of the one-line error)
    "steps 1e8": ({"steps": 100000000}, None, None, ["pipeline.steps is 100000000, outside [1, 1000]"]),
    "auto_resize 'no'": ({"auto_resize": "no"}, None, None, ["pipeline.auto_resize is 'no'; expected true or false"]),
    "steps 0": ({"steps": 0}, None, None, ["pipeline.steps is 0, outside"]),
    "steps -1": ({"steps": -1}, None, None, ["pipeline.steps is -1, outside"]),
    "steps 2.7": ({"steps": 2.7}, None, None, ["pipeline.steps is 2.7; expected an integer"]),
    "steps 'abc'": ({"steps": "abc"}, None, None, ["pipeline.steps is 'abc'"]),
    "dtype bogus": ({"dtype": "bogus"}, None, None, ["pipeline.dtype is 'bogus'; expected one of"]),
    "dtype int8": ({"dtype": "int8"}, None, None, ["pipeline.dtype is 'int8'"]),
    "guidance NaN": ({"guidance": float("nan")}, None, None, ["pipeline.guidance is nan; expected a finite number"]),
    "true_cfg_scale inf": ({"true_cfg_scale": float("inf")}, None, None, ["pipeline.true_cfg_scale is inf"]),
    "pipeline a list": ([1, 2], None, None, ["pipeline is list; expected an object"]),
    "file a list": (None, None, "[]", ["jaxedit.json: a JSON list, not an object"]),
    "unknown option": ({"stepz": 3}, None, None, ["pipeline.stepz: unknown option"]),
    "cache mag:1": ({"cache": "mag:1"}, None, None, ["pipeline.cache is 'mag:1'"]),
    "cache tea:-1": ({"cache": "tea:-1"}, None, None, ["pipeline.cache is 'tea:-1': tea takes a threshold >= 0"]),
    "scheduler bogus": ({"scheduler": "bogus"}, None, None, ["pipeline.scheduler is 'bogus': scheduler 'bogus'"]),
    "scheduler base_shift x": ({"scheduler": {"base_shift": "x"}}, None, None, ["pipeline.scheduler is"]),
    "cache fbc:-1": ({"cache": "fbc:-1"}, None, None, ["pipeline.cache is 'fbc:-1': fbc takes a threshold >= 0"]),
    "num_heads 0": (None, {"transformer": {"num_heads": 0}}, None, ["transformer config: num_heads is 0, outside"]),
    "t5 max_length 1e9": (None, {"t5": {"max_length": 10**9}}, None, ["t5 config: max_length is 1000000000"]),
    "heads not dividing": (None, {"transformer": {"num_heads": 5}}, None, ["not divisible by num_heads 5"]),
    "VAE scale NaN": (None, {"vae": {"scale_factor": float("nan")}}, None, ["vae config: scale_factor is nan"]),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_a_model_folders_bad_option_or_config_value_is_one_line_before_loading(case, tmp_path, capsys):
    """Checked as the same flag is on the command line, before any weight is read (the folder has none)."""
    pipeline, config, raw, words = BAD_OPTIONS[case]
    folder = model_folder(tmp_path, pipeline, config, raw)
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    with pytest.raises(SystemExit) as e:
        cli(["edit", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--prompt", "x",
             "--out", str(tmp_path / "o.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(folder / "jaxedit.json") in err and all(w in err for w in words), err


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--negative-prompt", "lone \ud800"], "--negative-prompt is not valid Unicode: a lone surrogate"),
        (["--negative-prompt", "x" * 20_001], "--negative-prompt is 20,001 characters, over the 20,000"),
        (["--true-cfg-scale", "inf"], "--true-cfg-scale is inf"),
        (["--size-level", "100000"], "--size-level is 100000, outside [16, 4096]"),
        (["--cache", "fbc:x"], "--cache is 'fbc:x': fbc takes a threshold >= 0"),
    ],
)
def test_model_flags_get_the_same_checks_before_loading(flags, words, tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    with pytest.raises(SystemExit) as e:
        cli(["edit", "--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "in.png"), "--prompt", "x",
             "--out", str(tmp_path / "o.png"), *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err and "no-model" not in err, err


def test_a_model_folders_loras_stay_inside_it(tmp_path, capsys):
    """A downloaded folder naming "../../x.safetensors", an absolute path or a link leading out is refused in one
    line before loading; a file inside it is taken (the same file passed with --lora is the user's choice)."""
    outside = tmp_path / "x.safetensors"
    save_file(kohya(*factors()), str(outside))
    folder = model_folder(tmp_path)
    (folder / "link.safetensors").symlink_to(outside)
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    argv = ["edit", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--prompt", "x", "--out",
            str(tmp_path / "o.png")]  # fmt: skip
    for path in ("../x.safetensors", "../../" * 8 + str(outside).lstrip("/"), str(outside), "link.safetensors"):
        model_folder(tmp_path, {"loras": [{"path": path, "scale": 0.5}]})
        with pytest.raises(SystemExit) as e:
            cli(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert f"pipeline.loras[0].path {path!r} leads outside the model folder" in err, err
    from jaxedit.options import folder_loras

    shutil.copy(outside, folder / "style.safetensors")
    assert folder_loras(folder, {"loras": [{"path": "style.safetensors"}]}) == [(folder / "style.safetensors", 1.0,
                                                                                   True)]  # fmt: skip
