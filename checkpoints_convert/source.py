"""Read PyTorch checkpoints stored as safetensors, without torch and without pickle.

A source is a single `.safetensors` file, a folder of shards with its
`*.safetensors.index.json`, or a folder holding exactly one `.safetensors` file
(e.g. a diffusers model folder). Tensors come back as numpy arrays (bfloat16 as
ml_dtypes.bfloat16), read lazily one (part of a) tensor at a time. Every file's header is
checked against the file when the source is opened (`read_header`), so a truncated or
malformed file (or shard) fails there, named, before any tensor is read or anything written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from checkpoints_convert.mapping import ConversionError, Index

_DTYPES = {
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
# bytes per element of every safetensors dtype (sub-byte float formats excepted); we read those in _DTYPES
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
            "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
            "I64": 8, "U64": 8, "F64": 8, "C64": 8}  # fmt: skip
MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit


def read_header(path: Path, name: str | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor: (shape, dtype)} of a safetensors file, its header checked against the file: JSON, known dtypes,
    each tensor's byte span = its shape x item size, spans contiguous from 0 to the end of the file.

    Reads only the header. Raises ConversionError naming the file (`name`, default the path) on any mismatch."""

    def bad(problem: str) -> ConversionError:
        return ConversionError(f"{name or path}: not a valid safetensors file: {problem}")

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
        raise ConversionError(f"{name or path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise bad(f"the header is not JSON ({e})") from None
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


class SafetensorsSource:
    """Names, shapes and lazy reads of the tensors of one checkpoint (maybe sharded)."""

    def __init__(self, path: str | Path, *, strip_prefix: str | None = None):
        self.path = Path(path)
        self.files, index = _checkpoint_files(self.path)
        self._handles = {}
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in self.files:
            for k, meta in read_header(f, f"{f} (a shard of {index})" if index else None).items():
                if k in self._where:
                    raise ConversionError(f"{self.path}: tensor {k} appears in both {self._where[k]} and {f}")
                self._where[k] = f
                self._meta[k] = meta
        if index:
            _check_index(index, self._where)
        self.rename: dict[str, str] = {k: k for k in self._where}
        if strip_prefix:
            self.strip(strip_prefix)

    def strip(self, prefix: str) -> None:
        """Drop `prefix` from every key that has it (e.g. `model.diffusion_model.`)."""
        self.rename = {(k[len(prefix) :] if k.startswith(prefix) else k): orig for k, orig in self.rename.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self._meta[orig][0] for k, orig in self.rename.items()}

    def dtype(self, key: str) -> np.dtype:
        name = self._meta[self.rename[key]][1]
        if name not in _DTYPES:
            raise ConversionError(f"{self.file_of(key)}: tensor {key} has unsupported dtype {name}")
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        return np.dtype(getattr(ml_dtypes, _DTYPES[name], None) or _DTYPES[name])

    def file_of(self, key: str) -> Path:
        return self._where[self.rename[key]]

    def read(self, key: str, index: Index = ()) -> np.ndarray:
        """source[key][index] as numpy, reading only that part from disk."""
        orig = self.rename[key]
        f = self._where[orig]
        try:
            h = self._handles.get(f)
            if h is None:
                h = self._handles[f] = safe_open(str(f), framework="numpy")
            sl = h.get_slice(orig)
            return np.asarray(sl[index] if index else sl[:])
        except (SafetensorError, OSError) as e:  # e.g. the file changed since it was opened
            raise ConversionError(f"{f}: tensor {orig} cannot be read: {e}") from None

    def describe(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.path} ({len(self.files)} shards)"


def _checkpoint_files(path: Path) -> tuple[list[Path], Path | None]:
    """(the .safetensors files of a checkpoint, its index if it has one)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _index_files(path), path
        if path.suffix != ".safetensors":
            raise ConversionError(f"{path}: not a .safetensors file (pickled .bin/.pt/.ckpt files are not read)")
        return [path], None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{path}: several index files ({', '.join(i.name for i in indexes)}); point at one")
    if indexes:
        return _index_files(indexes[0]), indexes[0]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise ConversionError(f"{path}: expected one .safetensors file or an index, found {found}")
    return files, None


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:  # not JSON, not an object, no weight_map
        raise ConversionError(f"{index}: not a safetensors index (no weight_map): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index}: weight_map is not an object {{tensor name: shard file name}}")
    return weight_map


def _index_files(index: Path) -> list[Path]:
    files = []
    for name in sorted(set(_weight_map(index).values())):
        f = index.parent / name
        if not f.is_file():
            raise ConversionError(f"{index}: shard {name} is listed but missing")
        files.append(f)
    return files


def _check_index(index: Path, where: dict[str, Path]) -> None:
    """Every tensor the index lists is in the shard it names."""
    for k, name in _weight_map(index).items():
        if where.get(k) != index.parent / name:
            found = f"it is in {where[k].name}" if k in where else "no shard holds it"
            raise ConversionError(f"{index.parent / name} (a shard of {index}): lacks tensor {k} ({found})")
