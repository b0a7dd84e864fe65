"""Orbax checkpoints of parameter pytrees (what the converters write and the models read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_params(path: str | Path, params: Any, *, force: bool = False) -> Path:
    """Write `params` (nested dict of arrays) as an Orbax checkpoint at `path`."""
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=force)
        ckptr.wait_until_finished()
    return path


def param_metadata(path: str | Path) -> Any:
    """Shapes and dtypes stored in a checkpoint, as a pytree of ShapeDtypeStructs."""
    path = _existing(path)
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta)


def load_params(path: str | Path, target: Any = None, *, dtype: Any = None) -> Any:
    """Read a parameter checkpoint.

    target: a pytree of `jax.ShapeDtypeStruct` (with `.sharding` for sharded restore,
    e.g. from `jax.eval_shape` + the sharding rules); each array is restored straight
    into its sharding. None: restore onto the default device as stored.
    dtype: cast every array to this dtype on restore (the target's dtypes are replaced); without a
    target, onto this process's first device (each process of a multi-host run reads its own copy).
    """
    path = _existing(path)
    if target is None and dtype is not None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=dev), param_metadata(path))
    elif target is not None and dtype is not None:
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=s.sharding), target)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


def _existing(path) -> Path:
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path
