"""Resource caps by default (#35): a prompt's length in characters is capped before any tokenizer sees it, and
every model folder refuses items of more image tokens than its default maximum (from its training resolution)."""

from __future__ import annotations

import json

from PIL import Image

from jaxedit import DEFAULT_MODEL
from jaxedit.cli import main as cli
from tests.test_faults_batch import items, latest, run, write_job


# item 7
def test_a_huge_prompt_fails_its_item_alone_and_is_cut_before_tokenizing(tmp_path):
    """A 1 MB prompt line is refused by length (a 100 MB one made the tokenizer take 8.8 GB and killed the job);
    the library's tokenize cuts a long prompt in characters before tokenizing it."""
    from jaxedit.kontext.text import load_tokenizer, tokenize

    lines = items(3)
    lines[1]["prompt"] = "make it red " * 100_000
    manifest, out = write_job(tmp_path, lines, n=3)
    assert run(manifest, out) == {"ok": 2, "failed": 1, "skipped": 0}
    error = latest(out)["i1"]["error"]
    assert "m.jsonl:2: field 'prompt' is 1,200,000 characters, over the 20,000 a prompt may have" in error, error

    tok, seen = load_tokenizer(DEFAULT_MODEL / "tokenizer"), []

    def spy(texts, **kw):
        seen.append(max(map(len, texts)))
        return tok(texts, **kw)

    ids = tokenize(spy, ["short", "a " * 500_000], 77, "CLIP")
    assert ids.shape == (2, 77) and max(seen) <= 20_000


# item 8
def test_every_model_folder_caps_image_tokens_from_its_training_resolution(tmp_path, capsys):
    """The default model (trained at 64 px) refuses a 4000x4000 photo kept at its size (125,000 tokens: it
    aborted with std::bad_alloc) in one line, before any work; other folders: 8 x 4,096 tokens, or their own
    max_image_tokens; --max-tokens lifts it."""
    from jaxedit.kontext.pipeline import KontextPipeline
    from jaxedit.options import max_image_tokens
    from jaxedit.step1x.pipeline import Step1XEditPipeline

    assert max_image_tokens({}) == 8 * 4096 and max_image_tokens({"resolution": 64}) == 128
    assert max_image_tokens({"resolution": 64, "max_image_tokens": 500}) == 500
    pipe = KontextPipeline.load(DEFAULT_MODEL, compile_cache=False)
    assert pipe.max_image_tokens == 128 and pipe.bucket_for((64, 64))[:2] == (64, 64)
    try:
        pipe.bucket_for((4000, 4000))
        raise AssertionError("not refused")
    except ValueError as e:
        assert "1 reference(s) and the target make 125000 image tokens, over the maximum of 128" in str(e), e
    step1x = object.__new__(Step1XEditPipeline)
    step1x.size_level, step1x.max_image_tokens = None, max_image_tokens({})  # keep the size
    assert step1x.bucket_for((1024, 1024)) == (1024, 1024)
    try:
        step1x.bucket_for((4000, 4000))
        raise AssertionError("not refused")
    except ValueError as e:
        assert "makes 125000 image tokens (target and reference), over the maximum of 32768" in str(e), e

    big = tmp_path / "big.png"
    Image.new("RGB", (4000, 4000), (200, 30, 30)).save(big)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "big", "image": str(big), "prompt": "make it blue"}) + "\n")
    assert cli(["batch", "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "125000 image tokens, over the maximum of 128" in latest(tmp_path / "out")["big"]["error"]
    assert "0 ok, 1 failed" in capsys.readouterr().out
