"""`jaxedit eval`: tiny benchmarks in GEdit-Bench's and ImgEdit's published layouts and jaxedit's pairs layout,
written by the tests; Python judges whose scores are known (tests/eval_judges.py) and a tiny Qwen2.5-VL judge
whose answer is forced by construction (tests/tiny_judge.py), so the tables are checked against hand-computed
numbers; strict parsing, resume after a kill, a bad item failing alone, one-line errors, the HTML report."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from PIL import Image

from jaxedit import cli
from jaxedit.evaluation import benchmarks, judges
from jaxedit.evaluation.run import evaluate
from tests import eval_judges

ROOT = Path(__file__).resolve().parents[1]

VIE = '''# This file is generated automatically through parse_prompt.py
_context_no_delimit = """You are a professional digital artist. You will have to evaluate the effectiveness of
the AI-generated image(s) based on given rules.

You will have to give your output in this way (Keep your reasoning concise and short.):
{
"score" : [...],
"reasoning" : "..."
}"""

_prompts_0shot_two_image_edit_rule = """RULES:

Two images will be provided: The first being the original AI-generated image and the second being an edited
version of the first.
"""

_prompts_0shot_tie_rule_SC = """
From scale 0 to 10:
Put the score in a list such that output score = [score1, score2].

Editing instruction: <instruction>
"""

_prompts_0shot_rule_PQ = """RULES:

The image is an AI-generated image.
Put the score in a list such that output score = [naturalness, artifacts]
"""
'''


class Same:
    """An editing pipeline (the batch protocol) whose edit is its input: no model needed."""

    def bucket_for(self, size, width, height):
        return size

    def prepare(self, image, width, height):
        return SimpleNamespace(bucket=image.size, image=image)

    def edit(self, prepared, prompts, seeds, guidance, steps):
        return [p.image for p in prepared]


def png(colour, size=(40, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_gedit(root: Path, rows: list[tuple], prompts: bool = True) -> Path:
    """GEdit-Bench's Hub layout: data/train-*.parquet (key, task_type, instruction, instruction_language,
    input_image / input_image_raw as Hub Image structs, Intersection_exist) and viescore/vie_prompts.py."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    images = [{"bytes": png((30 * i, 100, 200)), "path": None} for i in range(len(rows))]
    table = pa.table({
        "key": [r[0] for r in rows], "task_type": [r[1] for r in rows], "instruction": [r[2] for r in rows],
        "instruction_language": [r[3] for r in rows], "input_image": images, "input_image_raw": images,
        "Intersection_exist": [r[4] for r in rows],
    })  # fmt: skip
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    if prompts:
        (root / "viescore").mkdir()
        (root / "viescore" / "vie_prompts.py").write_text(VIE)
    return root


def write_imgedit(root: Path, items: dict[str, tuple[str, str]]) -> Path:
    """ImgEdit Basic: basic_edit.json {key: {id, prompt, edit_type}}, singleturn/<id>, prompts.json."""
    meta = {}
    for i, (key, (edit_type, prompt)) in enumerate(items.items()):
        rel = f"animal/{i:09d}.jpg"
        (root / "singleturn" / "animal").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (44, 36), (200, 20 * i, 50)).save(root / "singleturn" / rel)
        meta[key] = {"id": rel, "prompt": prompt, "edit_type": edit_type}
    (root / "basic_edit.json").write_text(json.dumps(meta, indent=4))
    rule = "\nYou are a data rater. Editing instruction: <edit_prompt>\nPrompt Compliance: A number from 1 to 5."
    (root / "prompts.json").write_text(json.dumps({t: rule for t, _ in items.values()}))
    return root


def write_pairs(root: Path, n: int, bad: int | None = None) -> Path:
    """jaxedit's pairs layout: benchmark.jsonl + sources and targets (item `bad`'s source is not an image)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        (root / f"s{i}.png").write_bytes(b"not a png" if i == bad else png((10 * i, 0, 0)))
        (root / f"t{i}.png").write_bytes(png((0, 10 * i, 0)))
        lines.append(json.dumps({"id": f"p{i}", "category": "odd" if i % 2 else "even", "instruction": f"edit {i}",
                                 "source": f"s{i}.png", "target": f"t{i}.png"}))  # fmt: skip
    (root / "benchmark.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run(bench_dir: Path, judge, out: Path, pipe=None):
    out.mkdir(parents=True, exist_ok=True)
    bench = benchmarks.read(bench_dir, out / "inputs")
    return evaluate(pipe or Same(), bench, judge, out, batch_size=2, defaults={"steps": 1, "guidance": 0.0},
                    model="same", seed=0, progress=False, log=lambda s: None)  # fmt: skip


def rows(out: Path) -> dict[str, list]:
    return {t["title"]: t["rows"] for t in json.loads((out / "summary.json").read_text())["tables"]}


GEDIT_ROWS = [("k1", "A", "a1", "en", True), ("k2", "A", "a2", "en", False), ("k3", "B", "b1", "en", True),
              ("k4", "B", "b2", "en", True), ("k1", "A", "c1", "cn", True)]  # fmt: skip


def test_gedit_tables_by_hand(tmp_path):
    """Per language and task type the means of SC, PQ and O = sqrt(SC PQ), the average row the mean of the types'
    means, the same over Intersection_exist; an answer that is not a score is `unparsed`, counted, left out."""
    bench = write_gedit(tmp_path / "gedit", GEDIT_ROWS)
    out = tmp_path / "out"
    got = run(bench, judges.PythonJudge("tests.eval_judges:gedit"), out)
    assert (got["judged"], got["unparsed"], got["failed"]) == (4, 1, 0)
    t = rows(out)
    assert t["GEdit-Bench en (full set)"] == [["A", 2, 6.0, 5.5, 5.0, 0, 0], ["B", 1, 6.0, 6.0, 6.0, 1, 0],
                                              ["average", 3, 6.0, 5.75, 5.5, 1, 0]]  # fmt: skip
    assert t["GEdit-Bench en (intersection set)"] == [["A", 1, 8.0, 2.0, 4.0, 0, 0], ["B", 1, 6.0, 6.0, 6.0, 1, 0],
                                                      ["average", 2, 7.0, 4.0, 5.0, 1, 0]]  # fmt: skip
    assert t["GEdit-Bench cn (full set)"] == [["A", 1, 10.0, 10.0, 10.0, 0, 0], ["average", 1, 10.0, 10.0, 10.0, 0, 0]]
    recs = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(recs) == {"en_k1", "en_k2", "en_k3", "en_k4", "cn_k1"}
    assert recs["en_k4"]["status"] == "unparsed" and "about a 7" in recs["en_k4"]["error"]
    prompts = benchmarks.read(bench, out / "inputs").prompts
    assert prompts["SC"].startswith("You are a professional") and "<instruction>" in prompts["SC"]
    assert "[naturalness, artifacts]" in prompts["PQ"] and "<instruction>" not in prompts["PQ"]


def test_imgedit_tables_by_hand(tmp_path):
    """Per edit type the mean of the items' scores rounded to 2 places; overall the mean of the types'."""
    bench = write_imgedit(tmp_path / "imgedit", {"1082": ("add", "add one"), "97": ("add", "add two"),
                                                 "510": ("remove", "remove one")})  # fmt: skip
    out = tmp_path / "out"
    run(bench, judges.PythonJudge("tests.eval_judges:imgedit"), out)
    assert rows(out)["ImgEdit Basic"] == [["add", 2, 3.25, 0, 0], ["remove", 1, 3.33, 0, 0],
                                          ["overall (mean of types)", 3, pytest.approx(3.29), 0, 0]]  # fmt: skip


def test_strict_parsing():
    """Only the benchmark's answer forms are read; out-of-range scores and anything else raise, never a guess."""
    assert judges.parse_vie('Sure. {\n"score" : [7, 3],\n"reasoning" : "ok"\n}') == [7, 3]
    assert judges.parse_vie("[6, 4]") == [6, 4] and judges.parse_vie("[6,5]\nA: 3") == [6, 5]
    for bad in ("[12, 4]", '{"score": [7]}', '{"score": 7}', "7", "six and four", '{"score": [7, -1]}', "[6,"):
        with pytest.raises(judges.Unparsed):
            judges.parse_vie(bad)
    assert judges.parse_imgedit("Brief reasoning: fine\nPrompt Compliance: 4\nVisual Seamlessness: 2") == [4, 2]
    for bad in ("Prompt Compliance: 6", "no scores here", "Score: 4.5"):
        with pytest.raises(judges.Unparsed):
            judges.parse_imgedit(bad)
    assert judges.gedit_record({"SC": "[8, 2]", "PQ": "[9, 4]"}) == {"SC": 2, "PQ": 4, "O": pytest.approx(8**0.5)}
    assert judges.imgedit_record({"score": "A: 1\nB: 2\nC: 2"}) == {"score": 1.67, "parts": [1, 2, 2]}


ANSWER = "[6,5]\rA: 3"  # (a carriage return: the newline token ends the prompt, the chain's tokens are distinct)


@pytest.fixture(scope="module")
def forced_judge(tmp_path_factory):
    from tests.tiny_judge import build_forced_judge

    return build_forced_judge(tmp_path_factory.mktemp("judge"), ANSWER)


def test_forced_qwen_judge_gedit_and_imgedit(forced_judge, tmp_path):
    """A judge folder converted with `checkpoints_convert qwen-vl` whose greedy answer is "[6,5]\\rA: 3": GEdit's
    SC (two images) and PQ read [6, 5] (SC = PQ = O = 5), ImgEdit's line 'A: 3' (3.0). Capped at 3 new tokens the
    answer is "[6,": recorded raw as unparsed, left out of the tables and counted."""
    judge = judges.QwenJudge(forced_judge, max_new_tokens=16, batch_size=2)
    gedit = write_gedit(tmp_path / "gedit", [("k1", "A", "a1", "en", True), ("k2", "B", "b1", "en", False)])
    run(gedit, judge, tmp_path / "g")
    recs = [json.loads(x) for x in (tmp_path / "g" / "results.jsonl").read_text().splitlines()]
    assert [r["answers"] for r in recs] == [{"SC": ANSWER, "PQ": ANSWER}] * 2
    assert rows(tmp_path / "g")["GEdit-Bench en (full set)"][-1] == ["average", 2, 5.0, 5.0, 5.0, 0, 0]
    imgedit = write_imgedit(tmp_path / "imgedit", {"1": ("add", "add a hat"), "2": ("style", "make it ukiyo-e")})
    run(imgedit, judge, tmp_path / "i")
    assert rows(tmp_path / "i")["ImgEdit Basic"][-1] == ["overall (mean of types)", 2, 3.0, 0, 0]
    judge.max_new_tokens = 3  # another judge setting: everything is judged again
    got = run(gedit, judge, tmp_path / "g")
    assert (got["judged"], got["unparsed"]) == (0, 2)
    rec = json.loads((tmp_path / "g" / "results.jsonl").read_text().splitlines()[0])
    assert rec["status"] == "unparsed" and rec["answers"]["SC"] == "[6,"
    assert rows(tmp_path / "g")["GEdit-Bench en (full set)"][-1] == ["average", 0, None, None, None, 2, 0]


def test_resume_after_kill_bad_item_and_report(tmp_path):
    """A run killed while judging keeps what it judged; the rerun edits nothing again and judges only the rest. An
    item whose source is not an image fails alone, named; report.html names every item."""
    bench = write_pairs(tmp_path / "pairs", 5, bad=3)
    out = tmp_path / "out"
    eval_judges.CALLS.clear()

    def dies(edited, **kw):
        if len(eval_judges.CALLS) == 2:
            raise KeyboardInterrupt  # the process killed mid-way
        return eval_judges.mean_red(edited, **kw)

    eval_judges.dies = dies
    with pytest.raises(KeyboardInterrupt):
        run(bench, judges.PythonJudge("tests.eval_judges:dies"), out)
    assert len((out / "judged.jsonl").read_text().splitlines()) == 2
    eval_judges.CALLS.clear()
    got = run(bench, judges.PythonJudge("tests.eval_judges:dies"), out)
    assert got["edits"] == {"ok": 0, "failed": 1, "skipped": 4} and len(eval_judges.CALLS) == 2
    assert (got["judged"], got["failed"]) == (4, 1)
    recs = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert "s3.png" in recs["p3"]["error"] and "\n" not in recs["p3"]["error"]
    assert all(recs[f"p{i}"]["scores"]["same"] for i in (0, 1, 2, 4))
    t = rows(out)["pairs"]
    assert t[-1][:2] == ["all", 4] and t[-1][-1] == 1 and t[-1][3] == 100.0  # same %: a rate
    html = (out / "report.html").read_text()
    assert all(f"<td>p{i}</td>" in html for i in range(5)) and "edits/p0.png" in html


@pytest.mark.parametrize(
    "case, expect",
    [("missing", "not a folder"), ("no_prompts", "vie_prompts.py"), ("bad_field", "field 'instruction' is missing"),
     ("no_column", "'instruction_language', 'input_image', 'Intersection_exist'")],
)  # fmt: skip
def test_bad_input_one_line(tmp_path, capsys, case, expect):
    """A missing benchmark, a missing prompt file, a bad field: one line naming it, exit code 2, before a model
    loads."""
    bench = tmp_path / "b"
    if case == "no_prompts":
        write_gedit(bench, GEDIT_ROWS[:1], prompts=False)
    if case == "bad_field":
        write_pairs(bench, 2)
        (bench / "benchmark.jsonl").write_text('{"id": "x", "category": "c", "source": "s0.png"}\n')
    if case == "no_column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        write_gedit(bench, GEDIT_ROWS[:1])
        pq.write_table(pa.table({"key": ["k"]}), bench / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--benchmark", str(bench), "--judge", "tests.eval_judges:gedit", "--out",
                  str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and expect in err, err
    assert "Traceback" not in err


@pytest.mark.slow  # about 55 s: two loads and compiles of the default model
def test_shapes_benchmark_equals_demo_quality(tmp_path, capsys):
    """`python -m shapes benchmark` + `jaxedit eval --judge shapes:score_edit` with the shipped default model give
    benchmarks/demo_quality.py's per-edit-type judged-correct rates and PSNRs on the same 12 test indices."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "shapes", "benchmark", "--out", str(tmp_path / "b"), "--count", "12"],
                   check=True, cwd=ROOT, env=env, capture_output=True)  # fmt: skip
    assert cli.main(["eval", "--benchmark", str(tmp_path / "b"), "--judge", "shapes:score_edit", "--out",
                     str(tmp_path / "out"), "--batch-size", "12", "--no-progress"]) == 0  # fmt: skip
    demo = subprocess.run([sys.executable, "benchmarks/demo_quality.py", "--count", "12", "--batch", "12"],
                          check=True, cwd=ROOT, env=env, capture_output=True, text=True).stdout  # fmt: skip
    want = {}
    for line in demo.splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1].isdigit():
            want[cells[0]] = [int(cells[1]), cells[2], cells[3], cells[5]]
    table, metrics = json.loads((tmp_path / "out" / "summary.json").read_text())["tables"]
    assert metrics["columns"] == ["category", "n", "l1"] and metrics["rows"][-1][:2] == ["all", 12]
    cols = table["columns"]
    got = {
        r[0]: [r[1], f"{r[cols.index('psnr')]:.2f}", f"{r[cols.index('psnr_source')]:.2f}",
               f"{r[cols.index('ok %')]:.1f}%"]
        for r in table["rows"]
    }  # fmt: skip
    print(demo, got)
    assert len(want) >= 4 and got == want
    assert np.isfinite([v for r in table["rows"] for v in r[2:5]]).all()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Our converted CLIP folder of a tiny random transformers CLIPModel (`tests.tiny_clip`)."""
    pytest.importorskip("torch")
    from tests.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))[3]


def metric_means(recs: list[dict], names: list[str]) -> list[list]:
    """The metrics table's rows computed by hand: per category, then over all items."""
    rows = []
    for c in ["even", "odd", "all"]:
        g = [r["metrics"] for r in recs if c in ("all", r["category"])]
        rows.append([c, len(g), *[pytest.approx(np.mean([m[k] for m in g if k in m])) for k in names]])
    return rows


def test_clip_metrics_and_converter_errors(forced_judge, tiny_clip, tmp_path, capsys):
    """L1 to the target for every item with one, without --clip too; with a CLIP folder converted by our converter
    CLIP-I (edit vs target) and CLIP-T (edit vs instruction), batched per judge batch (3 items: batches of 2, the
    last one short), each equal to a direct `l1` / `ClipScorer` call on the same images; the metrics table's means
    per category and overall equal hand-computed ones (summary.json, summary.md, report.html). A CLIP folder that is
    not one, a vision-language judge on a benchmark without judge prompts, and the converter given a folder that is
    not a Qwen2.5-VL, fail in one line."""
    from checkpoints_convert.__main__ import main as convert
    from jaxedit.evaluation.metrics import ClipScorer, l1

    bench = write_pairs(tmp_path / "pairs", 3)
    lines = [json.loads(x) for x in (bench / "benchmark.jsonl").read_text().splitlines()]
    del lines[2]["target"]  # an item without a target: CLIP-T only
    (bench / "benchmark.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    scorer = ClipScorer.load(tiny_clip, batch_size=2)
    judge = judges.PythonJudge("tests.eval_judges:mean_red")
    results = {}
    for name, clip in (("plain", None), ("clip", scorer)):
        out = tmp_path / name
        out.mkdir()
        evaluate(Same(), benchmarks.read(bench, out), judge, out, batch_size=2, defaults={"steps": 1, "guidance": 0.0},
                 model="same", seed=0, clip=clip, clip_id=name, progress=False, log=lambda s: None)  # fmt: skip
        results[name] = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    edits = [np.asarray(Image.open(bench / f"s{i}.png")) for i in range(3)]  # the identity pipeline's edits
    targets = [np.asarray(Image.open(bench / f"t{i}.png")) for i in range(2)]
    want_l1 = [l1(t, e) for t, e in zip(targets, edits)]
    assert [r.get("metrics") for r in results["plain"]] == [{"l1": want_l1[0]}, {"l1": want_l1[1]}, None]
    got = [r["metrics"] for r in results["clip"]]
    assert [m.get("l1") for m in got] == [*want_l1, None]
    clip_t = scorer.text_similarity(edits, [x["instruction"] for x in lines])
    clip_i = [scorer.image_similarity([e], [t])[0] for e, t in zip(edits, targets)]  # one at a time
    np.testing.assert_allclose([m["clip_text"] for m in got], clip_t, rtol=0, atol=1e-6)
    np.testing.assert_allclose([m["clip_image"] for m in got[:2]], clip_i, rtol=0, atol=1e-6)
    assert "clip_image" not in got[2] and len({round(float(v), 6) for v in clip_t}) == 3  # distinct values
    for name, names in (("plain", ["l1"]), ("clip", ["l1", "clip_image", "clip_text"])):
        t = rows(tmp_path / name)["metrics (mean per item)"]
        recs = [r for r in results[name] if r.get("metrics")]
        assert t == metric_means(recs, names), (name, t)
        assert "metrics (mean per item)" in (tmp_path / name / "summary.md").read_text()
    assert "<th>clip_image</th>" in (tmp_path / "clip" / "report.html").read_text()
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--benchmark", str(bench), "--judge", "tests.eval_judges:mean_red", "--out",
                  str(tmp_path / "o1"), "--clip", str(bench)])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: --clip {bench}: "), err
    assert "no clip.json" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--benchmark", str(bench), "--judge", str(forced_judge), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "judge prompts" in err
    assert convert(["qwen-vl", str(bench), str(tmp_path / "j")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err


def test_judge_on_a_mesh(forced_judge, tmp_path, capsys):
    """The forced judge on a data=2 and on a tensor=2 mesh (its weights restored straight into their shardings over
    2 of the 8 fake devices) answers and tabulates exactly as on one device; --judge-mesh auto on CPU devices (whose
    memory is unknown: replicated) uses as many data rows as a judge batch fills, and splits a judge too big for a
    chip over the tensor axis; a bad --judge-mesh fails in one line naming the flag."""
    gedit = write_gedit(tmp_path / "gedit", [("k1", "A", "a1", "en", True), ("k2", "B", "b1", "en", False),
                                             ("k3", "B", "b2", "en", True)])  # fmt: skip
    got = {}
    for spec in (None, "data=2", "tensor=2"):
        judge = judges.QwenJudge(forced_judge, max_new_tokens=16, batch_size=2, mesh=spec)
        if spec is not None:
            assert dict(judge.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1} | {spec[:-2]: 2}
            leaves = jax.tree.leaves(judge.params)
            assert all(len(x.sharding.device_set) == 2 for x in leaves)
            if spec == "tensor=2":  # the attention's heads split
                assert any(x.sharding.spec != jax.sharding.PartitionSpec() and "tensor" in str(x.sharding.spec)
                           for x in leaves)  # fmt: skip
        out = tmp_path / str(spec)
        run(gedit, judge, out)
        recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        recs = [{k: v for k, v in r.items() if k not in ("source", "edit")} for r in recs]  # (paths under out)
        got[spec] = (recs, (out / "summary.json").read_text())
    assert got["data=2"] == got[None] == got["tensor=2"]
    assert [r["answers"] for r in got[None][0]] == [{"SC": ANSWER, "PQ": ANSWER}] * 3
    cfg = judge.cfg
    assert dict(judges.judge_mesh("auto", cfg, "float32", 2, 16).shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    assert judges.judge_mesh("auto", cfg, "float32", 1, 16).devices.size == 1
    from jaxedit.presets import qwen_vl

    big = qwen_vl("qwen2.5-vl-7b")  # 16.6 GB in bf16 on 16 GB chips: pairs of chips, the heads split
    auto = judges.judge_mesh("auto", big, "bfloat16", 4, 512, memory=16e9)
    assert dict(auto.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    for spec, expect in (("tensor=x", "tensor needs an integer size"), ("data=16", "needs 16 devices, 8 here"),
                         ("pipe=2", "unknown axis 'pipe'")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cli.main(["eval", "--benchmark", str(gedit), "--judge", str(forced_judge), "--out", str(tmp_path / "o"),
                      "--judge-mesh", spec])  # fmt: skip
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: --judge-mesh {spec}: "), err
        assert expect in err, err
