"""Python judges for tests/test_eval.py (`jaxedit eval --judge tests.eval_judges:NAME`): scores looked up by
instruction, so the tables can be checked by hand."""

from __future__ import annotations

GEDIT = {"a1": (8, 2), "a2": (4, 9), "b1": (6, 6), "c1": (10, 10)}  # instruction -> (SC, PQ); "b2": not a dict
IMGEDIT = {"add one": 4.0, "add two": 2.5, "remove one": 3.33}
CALLS: list[str] = []


def gedit(edited, *, instruction, **_):
    CALLS.append(instruction)
    if instruction not in GEDIT:
        return "about a 7"
    sc, pq = GEDIT[instruction]
    return {"SC": sc, "PQ": pq}


def imgedit(edited, *, instruction, **_):
    return {"score": IMGEDIT[instruction]}


def mean_red(edited, *, source, target=None, **_):
    """Pairs: the edit's mean red channel, and whether the source equals the edit (identity pipelines)."""
    CALLS.append("pairs")
    return {"red": float(edited[..., 0].mean()), "same": bool((edited == source).all())}
