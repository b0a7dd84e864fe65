"""Training observability: progress line, metrics records, sample edits with the current weights."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
from PIL import Image

from jaxedit.kontext.pipeline import KontextPipeline
from jaxedit.train.monitor import Monitor, SampleEdits, progress_line


def test_progress_line():
    line = progress_line(250, 1000, {"loss": 0.123456}, 12.5, 3725.0)
    assert line == "step 250/1000 loss 0.12346 12.50 samples/s ETA 01:02:05 [#####...............]  25%"


def test_monitor_records_and_only_lead_writes(tmp_path, capsys):
    m = Monitor(tmp_path, total_steps=10, batch_size=4, start_step=2, lead=True, tb=False)
    rec = m.log(3, {"loss": np.float32(0.5), "lr": 1e-3}, {"n_bad": 1})
    assert rec["step"] == 3 and rec["loss"] == 0.5 and rec["n_bad"] == 1 and rec["samples_per_s"] > 0
    assert "step 3/10 loss 0.50000" in capsys.readouterr().out
    other = Monitor(tmp_path, total_steps=10, batch_size=4, start_step=2, lead=False, tb=False)
    other.log(4, {"loss": 0.25})
    assert capsys.readouterr().out == ""
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3]


def test_sample_edits_use_the_current_weights(tiny_kontext, tmp_path):
    _, folder = tiny_kontext
    rng = np.random.default_rng(0)
    items = []
    for i in range(2):
        src, tgt = tmp_path / f"s{i}.png", tmp_path / f"t{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)).save(src)
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)).save(tgt)
        items.append(types.SimpleNamespace(source=src, target=tgt, instruction=f"make it red {i}"))
    pipe = KontextPipeline.load(folder, compile_cache=False, auto_resize=False)
    sampler = SampleEdits(pipe, items, tmp_path / "run", steps=2, guidance=2.5)
    base = jax.tree.map(np.asarray, sampler.pipe.params["transformer"])
    first = np.asarray(Image.open(sampler(10, base)))
    assert first.shape == (2 * 32, 3 * 48, 3)
    np.testing.assert_array_equal(first[:32, :48], np.asarray(Image.open(items[0].source)))
    np.testing.assert_array_equal(first[32:, 96:], np.asarray(Image.open(items[1].target)))
    changed = jax.tree.map(lambda p: p * 1.5, base)
    second = np.asarray(Image.open(sampler(20, changed)))
    assert np.abs(second[:, 48:96].astype(int) - first[:, 48:96]).max() > 10  # the edits follow the weights
    again = np.asarray(Image.open(sampler(30, base)))
    np.testing.assert_array_equal(again, first)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "step_0000010.png",
        "step_0000020.png",
        "step_0000030.png",
    ]
