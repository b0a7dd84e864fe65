"""The shipped default model (jaxedit/default_model) really edits: a behavioural test of the whole stack.

Loads the model folder with the pipeline the CLI uses, edits the first test-split samples of
the synthetic shapes task (seeds never used in training) and asks the independent judge
(colour segmentation) whether each edit was carried out. No golden pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import shapes
from jaxedit import DEFAULT_MODEL

DEFAULT = DEFAULT_MODEL  # the shipped model (package data)
N = 24  # test indices 0..23: every edit type several times


@pytest.fixture(scope="module")
def edits():
    from jaxedit.kontext.pipeline import KontextPipeline

    pipe = KontextPipeline.load(DEFAULT, compile_cache=False)
    samples = [shapes.sample("test", i) for i in range(N)]
    outs = pipe([Image.fromarray(s.source) for s in samples], [s.instruction for s in samples], list(range(N)))
    return samples, [np.asarray(o.convert("RGB")) for o in outs]


def test_default_model_is_trained():
    desc = json.loads((DEFAULT / "jaxedit.json").read_text())
    assert not desc.get("pipeline", {}).get("random_weights", False)
    assert desc["family"] == "flux-kontext"
    size = sum(f.stat().st_size for f in DEFAULT.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"jaxedit/default_model is {size / 2**20:.1f} MB"


def test_edits_are_judged_correct_more_often_than_chance(edits):
    """What the shipped model achieves: on held-out seeds the judge accepts ~76% of its edits
    (benchmarks/demo_quality.py, docs/default_model.md: 17 of these 24, with the folder's true
    CFG scale 2; the previous model 15); an untrained model gets none. The issue's target (80%)
    is the xfail test below."""
    samples, outs = edits
    verdicts = [shapes.judge(o, s.target).ok for s, o in zip(samples, outs)]
    assert {s.edit for s in samples} == set(shapes.EDIT_TYPES)
    assert sum(verdicts) >= 14, f"{sum(verdicts)}/{N} edits judged correct"
    # enlarging is among what it has learnt best (88% on 240 test seeds; 6 of the 6 here)
    bigger = [ok for s, ok in zip(samples, verdicts) if s.edit == "bigger"]
    assert sum(bigger) >= 2 * len(bigger) / 3, f"{sum(bigger)}/{len(bigger)} 'bigger' edits judged correct"


@pytest.mark.xfail(strict=True, reason="issue 9 target not reached yet: the shipped model scores ~76%, not 80%")
def test_edits_meet_the_issue_target(edits):
    samples, outs = edits
    verdicts = [shapes.judge(o, s.target).ok for s, o in zip(samples, outs)]
    assert sum(verdicts) >= 0.8 * N
