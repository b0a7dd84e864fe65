"""A Qwen-Image-Edit release on disk (diffusers layout: model_index.json, transformer/, vae/, text_encoder/ (a
Qwen2.5-VL), tokenizer/, processor/, scheduler/; tiny random models) converted by `checkpoints_convert pipeline`
into a model folder, then edited through `jaxedit edit` with two reference images: the whole path a user takes.
Numerics are the other files' (test_qwen_image*.py: every part against diffusers)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from jaxedit import presets  # noqa: E402
from jaxedit.cli import main as cli  # noqa: E402
from jaxedit.qwen_image import pipeline as qp  # noqa: E402
from jaxedit.qwen_image import text as qt  # noqa: E402
from jaxedit.qwen_image.sampling import SchedulerConfig  # noqa: E402
from jaxedit.tokenizers_offline import SENTENCES  # noqa: E402
from references.qwen_image import qwen_image_transformer  # noqa: E402
from references.qwen_image_vae import qwen_image_vae  # noqa: E402
from tests.tiny_qwen import build_tiny_qwen_vl  # noqa: E402

PRESET = presets.get("qwen-image-edit-tiny")
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 9 * 28 * 28


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    src = tmp_path_factory.mktemp("qwen_image_release")
    (src / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    qwen_image_transformer(PRESET.transformer, seed=1).save_pretrained(src / "transformer", safe_serialization=True)
    qwen_image_vae(PRESET.vae, seed=2).save_pretrained(src / "vae", safe_serialization=True)
    te = src / "text_encoder"
    build_tiny_qwen_vl(te, [qt.TEMPLATE.split("{}")[0], "Picture 1: Picture 2: ", *SENTENCES],
                       hidden=PRESET.transformer.joint_attention_dim, min_pixels=MIN_PIXELS,
                       max_pixels=MAX_PIXELS)  # fmt: skip
    for d in ("tokenizer", "processor"):  # as a release splits them: the tokenizer's files, the processor's
        (src / d).mkdir()
        for f in te.iterdir():
            if f.suffix in (".json", ".txt", ".jinja") and not f.name.startswith(("model", "generation", "config")):
                if d == "processor" or f.name != "preprocessor_config.json":
                    shutil.copy2(f, src / d / f.name)
    for f in list(te.iterdir()):  # text_encoder/ holds the model only
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    (src / "scheduler").mkdir()
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **SchedulerConfig(max_shift=0.8).to_dict()}
    (src / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return src


def test_a_converted_release_edits_through_the_cli(release, tmp_path, monkeypatch, capsys):
    from checkpoints_convert.__main__ import main as convert

    dst = tmp_path / "model"
    assert convert(["pipeline", str(release), str(dst), "--preset", "qwen-image-edit-tiny"]) == 0
    desc = json.loads((dst / "jaxedit.json").read_text())
    assert desc["family"] == "qwen-image-edit" and desc["qwen"]["model"]["text"]["hidden_size"] == 28
    assert desc["pipeline"]["scheduler"]["max_shift"] == 0.8  # the release's scheduler, not the default
    assert sorted(p.name for p in dst.iterdir() if p.is_dir()) == ["qwen", "qwen_processor", "transformer", "vae"]

    monkeypatch.setattr(qp, "VAE_AREA", 64 * 64)  # the tiny models at small sizes (same code paths)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(80, 56), (48, 72)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "out.png"
    argv = ["edit", "--model", str(dst), "--image", str(tmp_path / "0.png"), "--image", str(tmp_path / "1.png"),
            "--prompt", "make the sky purple", "--out", str(out), "--steps", "2", "--dtype", "float32"]  # fmt: skip
    assert cli(argv) == 0, capsys.readouterr().err
    w, h = qp.calculate_dimensions(64 * 64, 48 / 72)  # the last reference's aspect
    assert Image.open(out).size == (w // 16 * 16, h // 16 * 16)

    # step caching from the command line: a TeaCache calibration's schedule, replayed by an edit
    schedule = tmp_path / "schedule.json"
    calibrate = ["calibrate-cache", "--model", str(dst), "--image", str(tmp_path / "0.png"), "--prompt", "a",
                 "--image", str(tmp_path / "1.png"), "--prompt", "b", "--threshold", "1e9", "--signal", "tea",
                 "--out", str(schedule), "--steps", "4", "--dtype", "float32"]  # fmt: skip
    assert cli(calibrate) == 0, capsys.readouterr().err
    assert json.loads(schedule.read_text())["skips"] == [False, True, True, False]  # tea: the last step computes
    assert cli([*argv[:-4], "--steps", "4", "--dtype", "float32", "--cache", f"schedule:{schedule}"]) == 0
    flagged = out.read_bytes()
    # the same schedule as the folder's option "cache" (a file inside the folder): the same image
    (dst / "schedule.json").write_text(schedule.read_text())
    desc = json.loads((dst / "jaxedit.json").read_text())
    desc["pipeline"]["cache"] = "schedule:schedule.json"
    (dst / "jaxedit.json").write_text(json.dumps(desc))
    assert cli([*argv[:-4], "--steps", "4", "--dtype", "float32"]) == 0
    assert out.read_bytes() == flagged

    # a flag of another family is refused in one line naming it
    with pytest.raises(SystemExit):
        cli([*argv, "--keep-size"])
    assert "--keep-size" in capsys.readouterr().err
