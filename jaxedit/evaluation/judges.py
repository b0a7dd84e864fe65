"""Judges of an edit, and the strict reading of their answers.

- `QwenJudge`: a Qwen2.5-VL judge folder (`python -m checkpoints_convert qwen-vl SRC OUT`: judge.json with the
  architecture, qwen/ the converted weights, qwen_processor/ the tokenizer and image processor), answering the
  benchmark's own prompts with `jaxedit.models.qwen2_5_vl_generate.generate` (greedy by default, batched), on one
  device or on a mesh (`judge_mesh`: its weights restored straight into their shardings).
- `PythonJudge`: `MODULE:FUNCTION`, imported at run time, called as FUNCTION(edited, source=, target=,
  instruction=, category=) on uint8 [H, W, 3] arrays (target None without one); it returns a dict of numbers or
  booleans (e.g. the shapes task's `shapes.score_edit`).

Answers are parsed strictly (`parse_vie`, `parse_imgedit`): anything that is not the benchmark's answer form, or a
score out of its range, raises `Unparsed` and is recorded with the raw answer, never guessed.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

JUDGE_JSON = "judge.json"
VIE_RANGE, IMGEDIT_RANGE = (0, 10), (1, 5)


class Unparsed(ValueError):
    """An answer that is not in the benchmark's form (the message says why)."""


def in_range(scores: list, lo: float, hi: float) -> list:
    for s in scores:
        if isinstance(s, bool) or not isinstance(s, int | float) or not lo <= s <= hi:
            raise Unparsed(f"score {s!r} is not a number in [{lo}, {hi}]")
    return scores


def parse_vie(answer: str, count: int = 2) -> list[float]:
    """VIEScore's scores of an answer: the JSON object from its first '{' to its last '}' with a "score" list, or
    a bare list "[a, b]" (viescore/utils.py `mllm_output_to_dict`, without its random guess); `count` scores in
    [0, 10]."""
    start, end = answer.find("{"), answer.rfind("}") + 1
    if start != -1 and end > start:
        try:
            scores = json.loads(answer[start:end]).get("score")
        except (json.JSONDecodeError, AttributeError):
            raise Unparsed("no JSON object with a 'score' list") from None
    else:
        bare = answer[answer.find("[") : answer.rfind("]") + 1]
        if not re.fullmatch(r"\[\d+, ?\d+\]", bare):
            raise Unparsed("neither a JSON object nor a list of scores")
        scores = json.loads(bare)
    if not isinstance(scores, list) or len(scores) != count:
        raise Unparsed(f"'score' is not a list of {count} numbers: {scores!r}")
    return in_range(scores, *VIE_RANGE)


def parse_imgedit(answer: str) -> list[int]:
    """ImgEdit's scores of an answer: every line "NAME: N" with N digits (Benchmark/Basic/step1_get_avgscore.py),
    at least one, each in [1, 5]."""
    scores = []
    for line in answer.splitlines():
        parts = line.strip().split(": ")
        if len(parts) == 2 and parts[1].isdigit():
            scores.append(int(parts[1]))
    if not scores:
        raise Unparsed("no line 'NAME: N'")
    return in_range(scores, *IMGEDIT_RANGE)


def gedit_record(answers: dict[str, str]) -> dict[str, float]:
    """SC = min of the SC answer's scores, PQ = min of the PQ answer's, O = sqrt(SC * PQ) (viescore/__init__.py)."""
    sc, pq = min(parse_vie(answers["SC"])), min(parse_vie(answers["PQ"]))
    return {"SC": sc, "PQ": pq, "O": math.sqrt(sc * pq)}


def imgedit_record(answers: dict[str, str]) -> dict[str, Any]:
    """The answer's scores and their mean rounded to 2 places (step1_get_avgscore.py)."""
    scores = parse_imgedit(answers["score"])
    return {"score": round(sum(scores) / len(scores), 2), "parts": scores}


def queries(kind: str, prompts: dict[str, str], instruction: str, source, edited) -> list[tuple[str, str, list, bool]]:
    """(name, prompt, images, text first) the judge is asked for one edit, in the benchmark's form: GEdit's SC
    (source and edit, then text) and PQ (edit, then text); ImgEdit's prompt of the edit type (text, then source
    and edit: basic_bench.py)."""
    if kind == "gedit":
        return [("SC", prompts["SC"].replace("<instruction>", instruction), [source, edited], False),
                ("PQ", prompts["PQ"], [edited], False)]  # fmt: skip
    if kind == "imgedit":
        return [("score", prompts["prompt"].replace("<edit_prompt>", instruction), [source, edited], True)]
    raise ValueError(f"a vision-language judge needs a benchmark with judge prompts (GEdit, ImgEdit), not {kind}")


RECORDS = {"gedit": gedit_record, "imgedit": imgedit_record}
NEEDED = {"gedit": ("SC", "PQ"), "imgedit": ("score",)}  # the scores the benchmark's tables take


class QwenJudge:
    """A Qwen2.5-VL judge folder; `ask(requests)` -> the answers (decoded, special tokens dropped)."""

    def __init__(self, folder: str | Path, *, max_new_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
                 batch_size: int = 1, dtype: str = "float32", mesh=None, weights: bool = True):  # fmt: skip
        """mesh: None (the default device), "auto" or axis sizes ("tensor=4", "data=2"; `judge_mesh`). weights
        False: the folder, its tokenizer and the mesh are checked now, the weights read by `load` (or the first
        `ask`), so the device memory stays free until the judge is needed."""
        from jaxedit.configs import QwenVLConfig
        from jaxedit.qwen_vl import QWEN_PROCESSOR, load_image_processor, load_tokenizer

        folder = Path(folder)
        desc = folder / JUDGE_JSON
        if not desc.is_file():
            raise FileNotFoundError(f"--judge {folder}: not a judge folder (no {JUDGE_JSON}; make one with "
                                    "`python -m checkpoints_convert qwen-vl SRC OUT`)")  # fmt: skip
        try:
            self.cfg = QwenVLConfig.from_dict(json.loads(desc.read_text())["model"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{desc}: not a judge description ({type(e).__name__}: {e})") from None
        self.mesh = None if mesh is None else judge_mesh(mesh, self.cfg, dtype, batch_size, max_new_tokens)
        self.params = None
        self.tokenizer = load_tokenizer(folder / QWEN_PROCESSOR)
        self.processor = load_image_processor(folder / QWEN_PROCESSOR)
        self.folder, self.dtype = folder, dtype
        self.kw = {"temperature": temperature, "seed": seed}
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        if weights:
            self.load()

    def load(self) -> None:
        """Read the weights (once): onto the default device, or straight into their shardings on the mesh."""
        if self.params is not None:
            return
        import jax.numpy as jnp

        from jaxedit.checkpoint import load_params

        dtype = jnp.dtype(self.dtype)
        if self.mesh is None:
            self.params = load_params(self.folder / "qwen", dtype=dtype)
        else:
            from jaxedit.models.qwen2_5_vl import abstract_params
            from jaxedit.parallel import sharding as sh

            target = sh.abstract_with_shardings(abstract_params(self.cfg, boxed=True), self.mesh, dtype=self.dtype)
            self.params = load_params(self.folder / "qwen", target, dtype=dtype)

    def identity(self) -> dict:
        from jaxedit.model_folder import fingerprint

        return {"judge": fingerprint(self.folder), "max_new_tokens": self.max_new_tokens, **self.kw}

    def ask(self, requests: list[tuple[str, list, bool]]) -> list[str]:
        """Answers to (prompt, images, text first) requests, `batch_size` at a time (one text-first setting each)."""
        from jaxedit.models.qwen2_5_vl_generate import generate_chat

        self.load()
        out = []
        for lo in range(0, len(requests), self.batch_size):
            chunk = requests[lo : lo + self.batch_size]
            for first in sorted({r[2] for r in chunk}):
                part = [r for r in chunk if r[2] == first]
                answers = generate_chat(self.params, self.cfg, self.tokenizer, self.processor, [r[0] for r in part],
                                        [r[1] for r in part], self.max_new_tokens, text_first=first, dtype=self.dtype,
                                        mesh=self.mesh, **self.kw)  # fmt: skip
                out += answers  # (requests of one chunk share their text-first setting in practice)
        return out


# a judge prompt's tokens the automatic mesh sizes the key / value cache for (GEdit's SC prompt with two 1024 px
# images is about 2,900: docs/scaling.md "The judge")
AUTO_PROMPT_TOKENS = 4096


def judge_mesh(option, cfg, dtype: str, batch: int, max_new_tokens: int, devices=None, memory: float | None = None):
    """The judge's `jax.sharding.Mesh` (axes data, fsdp, tensor) on the first devices of `devices` (default: the
    local devices) for the --judge-mesh option: axis sizes ("tensor=4", "data=2"; an axis of -1 takes the devices
    left over) on the first that many devices, or "auto": the pipelines' rule (`placement.rule`: replicated when
    a chip holds the weights and one prompt's key / value cache, else the smallest group of chips that does) with
    the group on `tensor` instead of `fsdp` (decoding re-gathers FSDP-sharded weights at every token: tensor=4
    ran the 7B 4x faster than fsdp=4 in docs/scaling.md; the part of it that does not divide the attention heads
    stays on `fsdp`), on no more `data` rows than the `batch` prompts of a
    generate call fill (one prompt at a time: one device, or one group). memory: bytes per chip (default: what
    the device reports; None on a CPU: replicated). ValueError "--judge-mesh ..." otherwise."""
    import math
    import warnings

    import jax
    import jax.numpy as jnp

    from jaxedit.configs import MeshConfig
    from jaxedit.models.qwen2_5_vl import abstract_params
    from jaxedit.parallel import placement
    from jaxedit.parallel.sharding import ici_sizes, make_mesh

    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)
    try:
        cfg_mesh = placement.parse(option)
        if isinstance(cfg_mesh, MeshConfig):
            if -1 in (cfg_mesh.data, cfg_mesh.fsdp, cfg_mesh.tensor):
                cfg_mesh = placement.resolve(cfg_mesh, n)
            sizes = (cfg_mesh.data, cfg_mesh.fsdp, cfg_mesh.tensor)
            if min(sizes) < 1:
                raise ValueError("axis sizes must be >= 1")
            if math.prod(sizes) > n:
                raise ValueError(f"needs {math.prod(sizes)} devices, {n} here")
    except ValueError as e:
        hint = "give 'auto' or axis sizes such as 'tensor=4' or 'data=2'"
        raise ValueError(f"--judge-mesh {option}: {e} ({hint})") from None
    if cfg_mesh == "auto":
        weights = placement.tree_bytes(abstract_params(cfg, jnp.dtype(dtype)))
        t = cfg.text
        cache = 2 * t.num_layers * (AUTO_PROMPT_TOKENS + max_new_tokens) * t.num_kv_heads * t.head_dim
        working = 2 * weights / max(t.num_layers, 1) + cache * jnp.dtype(dtype).itemsize
        with warnings.catch_warnings(record=True) as too_big:  # (the rule's own warning speaks of the pipelines)
            warnings.simplefilter("always")
            chosen = placement.rule(n, weights, working, memory or placement.chip_memory(devices[0]))
        if too_big:
            warnings.warn(f"--judge-mesh auto: by its estimate the judge's weights ({weights / 1e9:.1f} GB) and a "
                          f"prompt's cache do not fit {n} chip(s) even split over all of them; trying all of them "
                          "(the compiler's memory check has the last word)", stacklevel=2)  # fmt: skip
        tensor = math.gcd(chosen.fsdp, t.num_heads)  # (the rest of a group that does not divide the heads: fsdp)
        rows = min(chosen.data, -(-batch // -(-batch // chosen.data)))  # the fewest rows giving as few per row
        cfg_mesh = MeshConfig(data=rows, fsdp=chosen.fsdp // tensor, tensor=tensor)
    ici_sizes(cfg_mesh, n, "--judge-mesh")
    used = cfg_mesh.data * cfg_mesh.fsdp * cfg_mesh.tensor
    return make_mesh(cfg_mesh, devices[:used])


class PythonJudge:
    """`MODULE:FUNCTION` imported at run time; `score(edited, source, target, instruction, category)` -> dict."""

    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ValueError(f"--judge {spec}: give MODULE:FUNCTION (a Python judge) or a judge folder")
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--judge {spec}: cannot import it ({type(e).__name__}: {e})") from None
        self.spec = spec

    def identity(self) -> dict:
        return {"judge": self.spec}

    def score(self, edited: np.ndarray, *, kind: str = "pairs", **kw) -> dict[str, Any]:
        """The function's record (numbers or booleans by name, with the scores benchmark `kind`'s tables take);
        Unparsed if it is anything else."""
        try:
            rec = self.fn(edited, **kw)
        except Exception as e:  # noqa: BLE001 - the judge's own fault on this item: recorded, the rest go on
            raise Unparsed(f"{self.spec} raised {type(e).__name__}: {e}") from None
        if not isinstance(rec, dict) or not rec:
            raise Unparsed(f"{self.spec} returned {rec!r}, not a dict of scores")
        missing = [k for k in NEEDED.get(kind, ()) if k not in rec]
        if missing:
            raise Unparsed(f"{self.spec} returned no {', '.join(missing)} (a {kind} benchmark's scores)")
        for k, v in rec.items():
            if not isinstance(k, str) or not isinstance(v, bool | int | float) or not math.isfinite(float(v)):
                raise Unparsed(f"{self.spec} returned {k!r}: {v!r}, not a finite number or boolean")
        return {k: (bool(v) if isinstance(v, bool | np.bool_) else float(v)) for k, v in rec.items()}


def open_judge(spec: str, **kw) -> QwenJudge | PythonJudge:
    """A judge folder (a path that exists; kw: `QwenJudge`'s, e.g. weights=False to read them later) or
    `MODULE:FUNCTION`."""
    if Path(spec).is_dir():
        return QwenJudge(spec, **kw)
    if ":" in spec:
        return PythonJudge(spec)
    raise ValueError(f"--judge {spec}: neither a judge folder nor MODULE:FUNCTION")
