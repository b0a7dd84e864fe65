"""Validated reading of safetensors files into numpy, without torch and without pickle.

`read_header` checks a file's header against the file (JSON, known dtypes, each tensor's byte span =
its shape x item size, spans contiguous to the end of the file) before any tensor is read, so a
truncated or malformed file is named in one line instead of half-read. `numpy_dtype` maps a
safetensors dtype name to numpy (bfloat16 as ml_dtypes.bfloat16). Used by the converter
(`checkpoints_convert.source`) and by the LoRA reader (`jaxedit.lora`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


class SafetensorsFileError(ValueError):
    """A file that is not a valid safetensors file, or a tensor of it that cannot be read; names the file."""


DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# bytes per element of every safetensors dtype (sub-byte float formats excepted); we read those in DTYPES
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
            "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
            "I64": 8, "U64": 8, "F64": 8, "C64": 8}  # fmt: skip
MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit


def read_header(path: Path, name: str | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor: (shape, dtype)} of a safetensors file, its header checked against the file: JSON, known dtypes,
    each tensor's byte span = its shape x item size, spans contiguous from 0 to the end of the file.

    Reads only the header. Raises SafetensorsFileError naming the file (`name`, default the path) on any mismatch."""

    def bad(problem: str) -> SafetensorsFileError:
        return SafetensorsFileError(f"{name or path}: not a valid safetensors file: {problem}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise bad(f"header length {n} does not fit the file ({size} bytes; truncated, or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsFileError(f"{name or path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise bad(f"the header is not JSON ({e})") from None
    except RecursionError:  # (a header of a million nested lists)
        raise bad("the header's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, not an object")
    out, spans = {}, []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {key}: {str(entry)[:80]} is not {{dtype, shape, data_offsets: [begin, end]}}") from None
        if dtype not in ITEMSIZE:
            raise bad(f"tensor {key}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {key}: shape {shape!r} is not a list of sizes")
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end):
            raise bad(f"tensor {key}: data_offsets {[begin, end]} are not 0 <= begin <= end")
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise bad(f"tensor {key}: {dtype} {shape} is {math.prod(shape) * ITEMSIZE[dtype]} bytes, its "
                      f"data_offsets [{begin}, {end}] span {end - begin}")  # fmt: skip
        out[key] = (tuple(shape), dtype)
        spans.append((begin, end, key))
    data, pos = size - 8 - n, 0
    for begin, end, key in sorted(spans):
        if end > data:
            raise bad(f"tensor {key}: data_offsets [{begin}, {end}] run past the file's {data} bytes of data "
                      "(truncated?)")  # fmt: skip
        if begin != pos:
            where = "overlap the tensor before" if begin < pos else f"leave {begin - pos} bytes unused before"
            raise bad(f"tensor {key}: data_offsets [{begin}, {end}] {where} (offsets must be contiguous)")
        pos = end
    if pos < data:
        raise bad(f"{data - pos} bytes after the last tensor (the header describes {pos} of {data})")
    return out


def numpy_dtype(name: str, where: str = "") -> np.dtype:
    """The numpy dtype of a safetensors dtype name (BF16 -> ml_dtypes.bfloat16); SafetensorsFileError
    naming `where` (file and tensor) for one numpy cannot hold (float8 formats, unsigned 16-64 bit)."""
    if name not in DTYPES:
        raise SafetensorsFileError(f"{where or 'tensor'} has unsupported dtype {name}")
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    return np.dtype(getattr(ml_dtypes, DTYPES[name], None) or DTYPES[name])
