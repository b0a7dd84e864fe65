"""The synthetic shapes editing task: determinism, splits, edit semantics, rendering, judge, dataset files."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import shapes as S
from jaxedit.train.data import DataConfig, index_manifest

N_TEST = 300
COLOUR_ID = {name: i + 1 for i, name in enumerate(S.COLOURS)}


@pytest.fixture(scope="module")
def samples() -> list[S.Sample]:
    return [S.sample("test", i) for i in range(N_TEST)]


def spurious(image: np.ndarray, scene: dict) -> int:
    """Pixels segmented as a palette colour that no shape of `scene` has."""
    counts = np.bincount(S.segment(image).ravel(), minlength=len(S.COLOURS) + 1)
    present = {COLOUR_ID[s["colour"]] for s in scene["shapes"]}
    return int(sum(counts[k] for k in range(1, len(counts)) if k not in present))


def test_deterministic_per_split_and_index():
    a, b = S.sample("validation", 123), S.sample("validation", 123)
    np.testing.assert_array_equal(a.source, b.source)
    np.testing.assert_array_equal(a.target, b.target)
    assert (a.instruction, a.edit, a.source_scene, a.target_scene) == (
        b.instruction,
        b.edit,
        b.source_scene,
        b.target_scene,
    )
    assert a.source.shape == (64, 64, 3) and a.source.dtype == np.uint8
    others = [S.sample(split, 123) for split in ("train", "test")] + [S.sample("validation", 124)]
    for o in others:
        assert o.source_scene != a.source_scene and not np.array_equal(o.source, a.source)
    # the scene does not depend on the image size
    big = S.sample("validation", 123, size=96)
    assert big.source.shape == (96, 96, 3) and big.source_scene == a.source_scene and big.instruction == a.instruction


def test_split_ranges():
    assert S.seed_for("train", 0) == 0 and S.seed_for("validation", 5) == 10_000_005
    assert S.seed_for("test", S.SPLIT_SIZE - 1) == 29_999_999
    with pytest.raises(ValueError, match="validation"):
        S.sample("validation", 10_000_000)
    with pytest.raises(ValueError, match="-1"):
        S.sample("train", -1)
    with pytest.raises(ValueError, match="dev"):
        S.sample("dev", 0)
    with pytest.raises(ValueError, match="test"):
        S.write_split("/nonexistent", "test", count=5, start=S.SPLIT_SIZE - 2)


def test_scene_json_round_trip(samples):
    for s in samples[:20]:
        for d in (s.source_scene, s.target_scene):
            scene = S.Scene.from_dict(json.loads(json.dumps(d)))
            assert scene.to_dict() == d
            assert isinstance(scene.shapes[0], S.Shape) and isinstance(scene.background.a, tuple)
    scene = S.Scene.from_dict(samples[0].target_scene)
    np.testing.assert_array_equal(S.render(scene), samples[0].target)


def test_scene_invariants(samples):
    for s in samples:
        for d in (s.source_scene, s.target_scene):
            shapes = d["shapes"]
            assert 1 <= len(shapes) <= 3
            for key in ("kind", "colour", "cell"):
                assert len({x[key] for x in shapes}) == len(shapes), (s.index, key)
            for x in shapes:
                assert x["kind"] in S.KINDS and x["colour"] in S.COLOURS and 0 <= x["cell"] < 9
                assert x["size"] in S.SIZES and max(abs(x["dx"]), abs(x["dy"])) <= 0.1
            bg = d["background"]
            assert bg["kind"] in ("plain", "horizontal", "vertical")
            for c in (bg["a"], bg["b"]):
                assert max(c) - min(c) < 30 and 26 <= min(c) and max(c) <= 244
        assert s.target_scene["background"] == s.source_scene["background"]
        assert len(s.source_scene["shapes"]) >= (2 if s.edit == "remove" else 1)


def test_edit_types_roughly_uniform(samples):
    counts = Counter(s.edit for s in samples)
    assert set(counts) == set(S.EDIT_TYPES)
    expected = N_TEST / len(S.EDIT_TYPES)
    assert all(0.6 * expected <= n <= 1.4 * expected for n in counts.values()), counts


def apply_instruction(scene: dict, instruction: str) -> tuple[str, dict]:
    """An independent reading of the templates: (edit type, the scene the instruction asks for)."""
    shapes = [dict(x) for x in scene["shapes"]]
    by_kind = {x["kind"]: x for x in shapes}
    colours, kinds, positions = "|".join(S.COLOURS), "|".join(S.KINDS), "|".join(S.POSITIONS)
    if m := re.fullmatch(rf"make the ({colours}) ({kinds}) ({colours})", instruction):
        x = by_kind[m[2]]
        assert x["colour"] == m[1] and m[3] not in {y["colour"] for y in shapes}
        x["colour"], edit = m[3], "recolour"
    elif m := re.fullmatch(rf"remove the ({kinds})", instruction):
        shapes.remove(by_kind[m[1]])
        edit = "remove"
    elif m := re.fullmatch(rf"add a ({colours}) ({kinds}) at the ({positions})", instruction):
        assert m[1] not in {y["colour"] for y in shapes} and m[2] not in by_kind
        cell = S.POSITIONS.index(m[3])
        assert cell not in {y["cell"] for y in shapes}
        shapes.append({"kind": m[2], "colour": m[1], "cell": cell, "size": "large", "dx": 0.0, "dy": 0.0})
        edit = "add"
    elif m := re.fullmatch(rf"move the ({kinds}) to the ({positions})", instruction):
        cell = S.POSITIONS.index(m[2])
        assert cell not in {y["cell"] for y in shapes}
        by_kind[m[1]]["cell"], edit = cell, "move"
    elif m := re.fullmatch(rf"make the ({kinds}) (bigger|smaller)", instruction):
        x = by_kind[m[1]]
        before, after = ("small", "large") if m[2] == "bigger" else ("large", "small")
        assert x["size"] == before
        x["size"], edit = after, m[2]
    else:
        raise AssertionError(f"instruction matches no template: {instruction!r}")
    return edit, {"background": scene["background"], "shapes": shapes}


def test_instructions_describe_the_scene_change(samples):
    vocab = set(S.vocabulary())
    for s in samples:
        edit, expected = apply_instruction(s.source_scene, s.instruction)
        assert edit == s.edit, (s.index, s.instruction)
        assert expected == s.target_scene, (s.index, s.instruction)
        assert s.instruction in vocab
    words = {w for line in vocab for w in line.split()}
    assert {"circle", "star", "purple", "bigger", "smaller", "center", "bottom", "move", "add", "at"} <= words


def test_judge_accepts_target_rejects_source_for_every_edit_type(samples):
    rejected = Counter()
    for s in samples:
        good = S.judge(s.target, s.target)
        assert good.ok, (s.index, good.details)
        assert set(good.details) == set(S.COLOURS)
        bad = S.judge(s.source, s.target)
        assert not bad.ok, (s.index, s.instruction, bad.details)
        rejected[s.edit] += 1
    assert set(rejected) == set(S.EDIT_TYPES)
    # PIL images work too, and thresholds scale with the image size
    s = S.sample("test", 0, size=128)
    assert S.judge(Image.fromarray(s.target), Image.fromarray(s.target)).ok
    assert not S.judge(Image.fromarray(s.source), s.target).ok


def test_judge_tolerates_small_render_differences(samples):
    rng = np.random.default_rng(0)
    for s in samples[:50]:
        t = s.target
        assert S.judge(np.roll(t, 1, axis=1), t).ok  # one pixel off
        noisy = np.clip(t + rng.normal(0, 6, t.shape), 0, 255).astype(np.uint8)
        assert S.judge(noisy, t).ok
        blurry = Image.fromarray(t).resize((32, 32), Image.Resampling.BOX).resize((64, 64), Image.Resampling.BICUBIC)
        assert S.judge(blurry, t).ok


def test_judge_rejects_clearly_wrong_outputs(samples):
    n_swapped = 0
    for s in samples[:60]:
        scene = S.Scene.from_dict(s.target_scene)
        first = scene.shapes[0]
        blanked = S.render(scene.replace(first, None))
        assert not S.judge(blanked, s.target).ok
        empty = S.render(dataclasses.replace(scene, shapes=()))
        assert not S.judge(empty, s.target).ok
        moved = S.render(
            scene.replace(
                first, dataclasses.replace(first, cell=next(iter(set(range(9)) - {x.cell for x in scene.shapes})))
            )
        )
        assert not S.judge(moved, s.target).ok
        if len(scene.shapes) >= 2:
            a, b = scene.shapes[:2]
            swapped = scene.replace(a, dataclasses.replace(a, colour=b.colour))
            swapped = swapped.replace(b, dataclasses.replace(b, colour=a.colour))
            verdict = S.judge(S.render(swapped), s.target)
            assert not verdict.ok
            assert verdict.details[a.colour]["iou"] < 0.5
            n_swapped += 1
    assert n_swapped >= 20


def test_segmentation_of_antialiased_edges(samples):
    """No edge pixel takes a colour no shape has, and every shape is found."""
    for s in samples:
        for image, scene in ((s.source, s.source_scene), (s.target, s.target_scene)):
            assert spurious(image, scene) <= 2, (s.index, scene)
            seg = S.segment(image)
            for x in scene["shapes"]:
                assert (seg == COLOUR_ID[x["colour"]]).sum() >= 30, (s.index, x)
    # the worst cases for plain RGB distance: blue edges on light grey look purple, yellow
    # edges on dark grey look orange
    for colour, level in (("blue", 225), ("yellow", 40), ("red", 230), ("purple", 40), ("green", 128)):
        for kind in S.KINDS:
            scene = S.Scene(S.Background("plain", (level,) * 3, (level,) * 3), (S.Shape(kind, colour, 4, "small"),))
            for size in (64, 48):
                labels = set(np.unique(S.segment(S.render(scene, size)))) - {0}
                assert labels == {COLOUR_ID[colour]}, (colour, level, kind, size, labels)


def test_write_split_is_readable_by_training_data(tmp_path, capsys):
    out = tmp_path / "val"
    assert S.main(["write", str(out), "--split", "validation", "--count", "12", "--start", "5"]) == 0
    assert "12 validation pairs" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [d["index"] for d in lines] == list(range(5, 17))
    for d in lines:
        assert set(d) == {"id", "source", "target", "instruction", "edit", "split", "index"}
        i = d["index"]
        assert d["id"] == f"validation-{i}" and d["split"] == "validation"
        assert (d["source"], d["target"]) == (f"src/{i}.png", f"tgt/{i}.png")
        s = S.sample("validation", i)
        assert (d["instruction"], d["edit"]) == (s.instruction, s.edit)
        with Image.open(out / d["source"]) as a, Image.open(out / d["target"]) as b:
            assert a.size == b.size == (64, 64) and a.mode == b.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(a), s.source)
            np.testing.assert_array_equal(np.asarray(b), s.target)
    index = index_manifest(DataConfig(path=str(out)))
    assert not index.skipped
    assert [it.id for it in index.items] == [d["id"] for d in lines]

    manifest = S.write_split(tmp_path / "small", "train", count=3, size=32)
    with Image.open(manifest.parent / "tgt" / "2.png") as im:
        assert im.size == (32, 32)


def test_edit_weights_choose_which_indices_are_written(tmp_path, capsys):
    assert [S.edit_of("test", i) for i in range(60)] == [S.sample("test", i).edit for i in range(60)]
    weights = {"remove": 3.0, "add": 0.0}
    chosen = S.select_indices("train", 2400, start=100, edit_weights=weights)
    assert chosen == S.select_indices("train", 2400, start=100, edit_weights=weights)
    assert len(chosen) == len(set(chosen)) == 2400 and chosen == sorted(chosen) and chosen[0] >= 100
    counts = Counter(S.edit_of("train", i) for i in chosen)
    assert "add" not in counts
    # expected share: remove 3/7, the four other edits 1/7 each (binomial sd ~1%)
    assert abs(counts["remove"] / 2400 - 3 / 7) < 0.04, counts
    assert all(abs(counts[e] / 2400 - 1 / 7) < 0.03 for e in ("recolour", "move", "bigger", "smaller")), counts
    assert S.select_indices("train", 5, start=7) == [7, 8, 9, 10, 11]  # no weights: contiguous

    out = tmp_path / "weighted"
    only_moves = "move=1, recolour=0,add=0,remove=0,bigger=0,smaller=0"
    assert S.main(["write", str(out), "--count", "8", "--edit-weights", only_moves]) == 0
    assert "move 8" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {d["edit"] for d in lines} == {"move"} and len(lines) == 8
    for d in lines[:2]:
        s = S.sample("train", d["index"])
        assert d["instruction"] == s.instruction
        with Image.open(out / d["target"]) as b:
            np.testing.assert_array_equal(np.asarray(b), s.target)
    with pytest.raises(SystemExit):
        S.main(["write", str(out), "--edit-weights", "rotate=2"])
    assert "'rotate=2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'remove=x'"):
        S.parse_edit_weights("remove=x")
    with pytest.raises(ValueError, match=">= 0"):
        S.select_indices("train", 3, edit_weights={"remove": -1.0})
