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
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from checkpoints_convert.mapping import ConversionError, Index
from jaxedit import safetensors_file
from jaxedit.safetensors_file import ITEMSIZE, MAX_HEADER  # noqa: F401  (their home before the move)


def read_header(path: Path, name: str | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """`jaxedit.safetensors_file.read_header`, raising ConversionError."""
    try:
        return safetensors_file.read_header(path, name)
    except safetensors_file.SafetensorsFileError as e:
        raise ConversionError(str(e)) from None


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
        try:
            return safetensors_file.numpy_dtype(name, f"{self.file_of(key)}: tensor {key}")
        except safetensors_file.SafetensorsFileError as e:
            raise ConversionError(str(e)) from None

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
            if not index and not self._meta[orig][0]:  # a scalar (e.g. CLIP's logit_scale): no slice to take
                return np.asarray(h.get_tensor(orig))
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
