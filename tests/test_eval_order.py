"""`jaxedit eval`'s order on a device: every edit first, the editing pipeline released (its arrays no longer live),
then the judge loaded; a rerun with nothing left to edit loads no editing model, with nothing left to judge no
judge either; the forced Qwen2.5-VL judge (tests/tiny_judge.py) on a data=2 mesh tabulates as on one device."""

from __future__ import annotations

import json
import shutil
import weakref

import jax
import pytest

from jaxedit import cli
from jaxedit.evaluation import benchmarks, judges, run
from tests.test_eval import ANSWER, Same, write_gedit

ROWS = [("k1", "A", "a1", "en", True), ("k2", "B", "b1", "en", False), ("k3", "B", "b2", "en", True)]


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    from tests.tiny_judge import build_forced_judge

    return build_forced_judge(tmp_path_factory.mktemp("judge"), ANSWER)


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def eval_args(bench, judge, out, mesh: str) -> list[str]:
    """The shipped default model, one step per edit, the forced judge on `mesh`."""
    return ["eval", "--benchmark", str(bench), "--judge", str(judge), "--out", str(out), "--steps", "1",
            "--batch-size", "3", "--judge-max-tokens", "16", "--judge-mesh", mesh, "--no-progress"]  # fmt: skip


def test_edit_release_then_judge_and_reruns(judge_folder, tmp_path, monkeypatch, capsys):
    """cli.main(["eval", ...]) with the default model and the forced judge on a GEdit-style benchmark: the
    editing model loads, edits all 3 items, and when the judge's weights load every edit is on disk and none of
    the arrays the editing model's load made is live (their bytes are gone from `jax.live_arrays()`). A rerun
    loads neither model (both loaders fail if called) and writes the same summary. A copy of the edits judged
    with --judge-mesh data=2 (2 of the 8 fake devices) loads no editing model, only the judge, and its summary
    equals the one-device run's."""
    bench = write_gedit(tmp_path / "gedit", ROWS)
    events, editor = [], {}
    load_pipeline, judge_load = cli.load_pipeline, judges.QwenJudge.load

    def loading_pipeline(args):
        before = jax.live_arrays()
        seen = {id(a) for a in before}
        pipe = load_pipeline(args)
        new = [a for a in jax.live_arrays() if id(a) not in seen]
        editor["refs"] = [weakref.ref(a) for a in new]
        editor["bytes"] = sum(a.nbytes for a in new)
        del before, new
        events.append("load editing model")
        return pipe

    def loading_judge(self):
        if self.params is not None:  # (ask's call: loaded already)
            return
        alive = [r() for r in editor.get("refs", []) if r() is not None]
        edited = sorted(p.name for p in (out / "edits").glob("*.png"))
        events.append(("load judge", len(alive), sum(a.nbytes for a in alive), edited, live_bytes()))
        del alive
        judge_load(self)

    monkeypatch.setattr(cli, "load_pipeline", loading_pipeline)
    monkeypatch.setattr(judges.QwenJudge, "load", loading_judge)
    out = tmp_path / "one"
    assert cli.main(eval_args(bench, judge_folder, out, "data=1")) == 0
    assert editor["bytes"] > 1_000_000, editor["bytes"]  # the default model's weights (13 MB folder)
    assert events[0] == "load editing model" and events[1][0] == "load judge" and len(events) == 2, events
    _, alive, alive_bytes, edited, live = events[1]
    assert edited == ["en_k1.png", "en_k2.png", "en_k3.png"]
    assert (alive, alive_bytes) == (0, 0), (alive, alive_bytes, editor["bytes"])
    print(f"editing model's arrays {editor['bytes']} B; live at the judge's load {live} B")
    summary = (out / "summary.json").read_text()
    assert json.loads(summary)["tables"][0]["rows"][-1] == ["average", 3, 5.0, 5.0, 5.0, 0, 0]
    capsys.readouterr()

    def never(*a, **k):
        raise AssertionError("loaded")

    monkeypatch.setattr(cli, "load_pipeline", never)
    monkeypatch.setattr(judges.QwenJudge, "load", never)
    assert cli.main(eval_args(bench, judge_folder, out, "data=1")) == 0
    assert (out / "summary.json").read_text() == summary
    assert "editing model is not loaded" in capsys.readouterr().err

    two = tmp_path / "two"  # the edits done, none judged: only the judge loads, on a data=2 mesh
    two.mkdir()
    shutil.copytree(out / "edits", two / "edits")
    shutil.copy(out / run.EDITOR, two / run.EDITOR)
    events.clear()
    monkeypatch.setattr(judges.QwenJudge, "load", loading_judge)
    out = two
    assert cli.main(eval_args(bench, judge_folder, two, "data=2")) == 0
    assert [e[0] for e in events] == ["load judge"]
    assert (two / "summary.json").read_text() == summary


def test_editing_model_loads_only_with_work_left(tmp_path):
    """`run.edit_all` calls its loader only when an item is left to edit under the options recorded in
    OUT/editor.json: not on a rerun with the same options, again with other options (their identity unknown
    until loaded), again for an edit whose PNG is gone (an interrupted edit resumes); without options (a loaded
    pipeline handed in) it always does."""
    bench_dir = write_gedit(tmp_path / "gedit", ROWS)
    out = tmp_path / "out"
    out.mkdir()
    bench = benchmarks.read(bench_dir, out / "inputs")
    loads = []

    def open_pipe():
        loads.append(1)
        return Same(), {"steps": 1, "guidance": 0.0}, "same"

    def edit(options):
        loads.clear()
        counts = run.edit_all(open_pipe, bench, out, batch_size=2, seed=0, options=options, progress=False,
                              log=lambda s: None)  # fmt: skip
        return len(loads), counts

    assert edit("a") == (1, {"ok": 3, "failed": 0, "skipped": 0})
    assert edit("a") == (0, {"ok": 0, "failed": 0, "skipped": 3})
    assert edit("b") == (1, {"ok": 0, "failed": 0, "skipped": 3})
    (out / "edits" / "en_k2.png").unlink()
    assert edit("b") == (1, {"ok": 1, "failed": 0, "skipped": 2})
    assert edit(None) == (1, {"ok": 0, "failed": 0, "skipped": 3})
    assert json.loads((out / run.EDITOR).read_text())["options"] == "b"


def test_clip_folder_loads_only_with_work_left(tmp_path, monkeypatch):
    """`run.judge_all` given a CLIP folder (as the CLI does) loads it when an item is left to judge, with the same
    CLIP-T as a scorer loaded beforehand; a rerun with every item judged does not load it."""
    pytest.importorskip("torch")
    from jaxedit.evaluation.metrics import ClipScorer
    from tests.tiny_clip import build_tiny_clip

    clip_dir = build_tiny_clip(tmp_path / "clip")[3]
    bench_dir = write_gedit(tmp_path / "gedit", ROWS)
    judge = judges.PythonJudge("tests.eval_judges:gedit")
    got = {}
    for name, clip in (("folder", str(clip_dir)), ("scorer", ClipScorer.load(clip_dir, batch_size=2))):
        out = tmp_path / name
        out.mkdir()
        bench = benchmarks.read(bench_dir, out / "inputs")
        counts = run.edit_all(lambda: (Same(), {"steps": 1, "guidance": 0.0}, "same"), bench, out, batch_size=2,
                              seed=0, progress=False, log=lambda s: None)  # fmt: skip
        run.judge_all(judge, bench, out, counts, batch_size=2, clip=clip, clip_id="c", log=lambda s: None)
        got[name] = [
            r["metrics"]["clip_text"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
        ]
    assert got["folder"] == pytest.approx(got["scorer"], abs=1e-6) and len(got["folder"]) == 3

    def never(*a, **k):
        raise AssertionError("loaded")

    monkeypatch.setattr(ClipScorer, "load", never)
    out = tmp_path / "folder"
    bench = benchmarks.read(bench_dir, out / "inputs")
    got = run.judge_all(judge, bench, out, {}, batch_size=2, clip=str(clip_dir), clip_id="c", log=lambda s: None)
    assert got["judged"] + got["unparsed"] == 3


def test_damaged_judge_weights_fail_in_one_line_when_judging_begins(judge_folder, tmp_path):
    """A judge folder whose weights are damaged passes the checks before editing (judge.json, tokenizer, mesh) and
    fails when its weights are read, after the edits: `run.LoadFailed`, one line naming the folder and file."""
    judge_dir = tmp_path / "judge"
    shutil.copytree(judge_folder, judge_dir)
    victim = max((p for p in (judge_dir / "qwen").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    judge = judges.QwenJudge(judge_dir, max_new_tokens=16, weights=False)
    out = tmp_path / "out"
    out.mkdir()
    bench = benchmarks.read(write_gedit(tmp_path / "gedit", ROWS[:1]), out / "inputs")
    counts = run.edit_all(lambda: (Same(), {"steps": 1, "guidance": 0.0}, "same"), bench, out, batch_size=1, seed=0,
                          progress=False, log=lambda s: None)  # fmt: skip
    assert counts["ok"] == 1
    with pytest.raises(run.LoadFailed) as e:
        run.judge_all(judge, bench, out, counts, batch_size=1, log=lambda s: None)
    msg = str(e.value)
    assert msg.startswith(f"--judge {judge_dir}: ") and "damaged" in msg and "\n" not in msg, msg
