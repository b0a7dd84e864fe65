"""Read PyTorch checkpoints stored as safetensors, without torch and without pickle.

A source is a single `.safetensors` file, a folder of shards with its
`*.safetensors.index.json`, or a folder holding exactly one `.safetensors` file
(e.g. a diffusers model folder). Tensors come back as numpy arrays (bfloat16 as
ml_dtypes.bfloat16), read lazily one (part of a) tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

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


class SafetensorsSource:
    """Names, shapes and lazy reads of the tensors of one checkpoint (maybe sharded)."""

    def __init__(self, path: str | Path, *, strip_prefix: str | None = None):
        self.path = Path(path)
        self.files = _checkpoint_files(self.path)
        self._handles = {}
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for f in self.files:
            with safe_open(str(f), framework="numpy") as h:
                for k in h.keys():
                    if k in self._where:
                        raise ConversionError(f"{self.path}: tensor {k} appears in both {self._where[k]} and {f}")
                    sl = h.get_slice(k)
                    self._where[k] = f
                    self._meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
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
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(f), framework="numpy")
        sl = h.get_slice(orig)
        a = sl[index] if index else sl[:]
        return np.asarray(a)

    def describe(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.path} ({len(self.files)} shards)"


def _checkpoint_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _index_files(path)
        if path.suffix != ".safetensors":
            raise ConversionError(f"{path}: not a .safetensors file (pickled .bin/.pt/.ckpt files are not read)")
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{path}: several index files ({', '.join(i.name for i in indexes)}); point at one")
    if indexes:
        return _index_files(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise ConversionError(f"{path}: expected one .safetensors file or an index, found {found}")
    return files


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ConversionError(f"{index}: not a safetensors index (no weight_map): {e}") from None
    files = []
    for name in sorted(set(weight_map.values())):
        f = index.parent / name
        if not f.is_file():
            raise ConversionError(f"{index}: shard {name} is listed but missing")
        files.append(f)
    return files
