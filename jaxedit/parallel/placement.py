"""Where a pipeline's programs run: one mesh per pipeline, shared by the runtime and the planner.

A pipeline is placed on one mesh over its devices (`MeshConfig`: data x fsdp x tensor). Every part's
parameters are sharded on it by the logical rule table (`jaxedit.parallel.sharding`): on `data` they are
replicated, on `fsdp` split along the model width, on `tensor` along heads and MLP features (the VAE's
convolutions are always replicated). A batch is split over `data` x `fsdp` and padded up to a multiple
of that (the padding items repeat the last one and are dropped from the outputs), so a batch of any size
runs on the same mesh and the same parameter placement.

`mesh="auto"` (`jaxedit.pipelines.base.choose_mesh`): a recorded choice of `jaxedit plan --mesh auto` for
this preset, quantisation, kind of chip and chip count if there is one (`recorded`); otherwise replicated
data parallel when a chip holds the weights and one sample's working set, else the smallest group of
neighbouring chips that does, FSDP-sharding the weights within the group, data parallel across groups.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxedit.configs import MeshConfig
from jaxedit.parallel.sharding import ici_sizes
from jaxedit.staged import write_file

# of a chip's memory, what the weights and one sample's working set may use (the rest: the runtime's own
# buffers, fragmentation, the VAE and text programs' temporaries)
USABLE = 0.9
# one sample's working set of the sampling loop: two blocks' weights (the scan's current and next layer)
# plus activations of this many bytes per token and unit of model width. From the TPU compiler's figures for
# FLUX.1 Kontext [dev] at 1024 px, batch 1 (8,704 tokens x 3,072 wide): v6e-1 bf16, 3.73 GB of temporaries
# = 2 x 0.68 GB (a double block in bf16) + 2.37 GB (89 bytes per token-width); the int8 program's 2.5 GB is
# within this rule's 3.05 GB.
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 89.0


def parse(spec: str | MeshConfig | None) -> MeshConfig | str | None:
    """A mesh option: None (replicated data parallel), "auto", or a `MeshConfig` / its text
    ("data=2,fsdp=4"). ValueError naming the option otherwise."""
    if spec is None or isinstance(spec, MeshConfig):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"mesh must be 'auto' or axis sizes such as 'data=2,fsdp=4', got {spec!r}")
    if spec.strip() == "auto":
        return "auto"
    cfg = MeshConfig.parse(spec)
    if cfg.dcn_data != 1 or cfg.dcn_fsdp != 1:
        raise ValueError(f"mesh {spec!r}: the pipelines run on one slice (no dcn_* axes)")
    return cfg


def resolve(cfg: MeshConfig, n: int) -> MeshConfig:
    """`cfg` with an axis of size -1 given the devices left over, checked against `n` devices."""
    sizes = ici_sizes(cfg, n, f"mesh {text(cfg)}")
    if any(s < 1 for s in sizes) or math.prod(sizes) != n:
        raise ValueError(f"mesh {text(cfg)} does not use exactly the {n} devices")
    return MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])


def config_of(mesh: jax.sharding.Mesh) -> MeshConfig:
    """The `MeshConfig` of a pipeline mesh (axes data, fsdp, tensor)."""
    return MeshConfig(data=mesh.shape["data"], fsdp=mesh.shape["fsdp"], tensor=mesh.shape["tensor"])


def text(cfg: MeshConfig) -> str:
    """'data=2,fsdp=4' (axes of size 1 left out; 'data=1' for a single device)."""
    parts = [f"{k}={v}" for k, v in (("data", cfg.data), ("fsdp", cfg.fsdp), ("tensor", cfg.tensor)) if v != 1]
    return ",".join(parts) or "data=1"


def batch_parallel(mesh: jax.sharding.Mesh) -> int:
    """How many ways a batch is split on `mesh` (data x fsdp: the rule table's act_batch)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def padded(batch: int, mesh: jax.sharding.Mesh) -> int:
    """The batch size a batch of `batch` items runs at: the next multiple of `batch_parallel(mesh)`."""
    k = batch_parallel(mesh)
    return -(-batch // k) * k


def rows_for(batch: int, mesh: jax.sharding.Mesh) -> int:
    """How many rows of the mesh's `data` axis a batch of `batch` items runs on: the fewest that give each
    device as few items as all of them would (a batch of 2 on data=8 runs on 2 devices, unpadded)."""
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    per_device = -(-batch // (data * fsdp))
    return min(data, -(-batch // (per_device * fsdp)))


def restrict(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Arrays on a mesh, as arrays on `mesh`, the first rows of its `data` axis (same PartitionSpecs): views
    of the shards those devices hold, nothing copied. Arrays elsewhere (on the host) are left as they are."""
    keep = set(mesh.devices.flat)

    def view(a):
        if not isinstance(a, jax.Array) or not isinstance(a.sharding, jax.sharding.NamedSharding):
            return a
        sharding = jax.sharding.NamedSharding(mesh, a.sharding.spec)
        shards = [s.data for s in a.addressable_shards if s.device in keep]
        return jax.make_array_from_single_device_arrays(a.shape, sharding, shards)

    return jax.tree.map(view, tree)


def pad(a, n: int):
    """`a` (first axis the batch) with its last item repeated up to `n` items (a list or an array)."""
    if isinstance(a, list | tuple):
        return list(a) + [a[-1]] * (n - len(a))
    a = np.asarray(a)
    return a if len(a) == n else np.concatenate([a, np.repeat(a[-1:], n - len(a), axis=0)])


# --------------------------------------------------------------------------------------------------
# auto


@dataclasses.dataclass(frozen=True)
class Footprint:
    """What `auto` places by: bytes of the weights the devices hold, tokens of one typical edit, bytes of the
    transformer's largest block."""

    weights: float
    tokens: int
    block_bytes: float


def tree_bytes(tree: Any) -> int:
    """Bytes of every leaf of a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def working_set_bytes(width: int, tokens: int, block_bytes: float, batch_per_chip: int = 1) -> float:
    """One chip's working set of the sampling loop: two blocks' weights (`block_bytes`: the largest block's) and
    the activations (`ACTIVATION_BYTES_PER_TOKEN_WIDTH`)."""
    return 2 * block_bytes + ACTIVATION_BYTES_PER_TOKEN_WIDTH * tokens * width * batch_per_chip


def chip_memory(device) -> float | None:
    """A device's memory in bytes (`memory_stats()["bytes_limit"]`); None where it does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - topology descriptions and some backends have none
        return None
    return float(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def fsdp_groups(n: int) -> list[int]:
    """Group sizes to try, smallest first: 1 (replicated) and the powers of two dividing n, then n."""
    groups = [g for g in (2**k for k in range(int(math.log2(n)) + 1)) if n % g == 0]
    return groups + ([n] if n not in groups else [])


def rule(n: int, weights: float, working: float, memory: float | None) -> MeshConfig:
    """The rule of `auto`: data parallel over the smallest FSDP group of the `n` chips whose per-chip share of
    `weights` plus `working` fits `USABLE` of `memory` (None: unknown, replicated). If none does by this
    estimate, all chips in one FSDP group (with a warning): the compiler's own memory check has the last word."""
    if memory is None:
        return MeshConfig(data=n, fsdp=1)
    for g in fsdp_groups(n):
        if weights / g + working <= USABLE * memory:
            return MeshConfig(data=n // g, fsdp=g)
    need = weights / n + working
    warnings.warn(
        f"mesh auto: by its estimate the weights ({weights / 1e9:.1f} GB) and one edit's working set do not fit "
        f"{n} chip(s) of {memory / 1e9:.1f} GB even sharded over all of them ({need / 1e9:.1f} GB per chip); trying "
        f"fsdp={n} (more chips, --quantize int8 or --text-on-cpu would help)",
        stacklevel=2,
    )
    return MeshConfig(data=1, fsdp=n)


# of a chip's memory, what a training run's sharded state (parameters, gradients, optimizer moments) may take:
# the rest holds the activations of a few samples per chip (docs/scaling.md: 4-6 GB each at 1024 px)
TRAIN_STATE_SHARE = 0.4


def train_rule(n: int, state_bytes: float, memory: float | None) -> MeshConfig:
    """A training run's mesh "auto": hybrid FSDP, the training state sharded within the smallest group of 1, 2,
    4, ... neighbouring chips whose share of `state_bytes` is at most `TRAIN_STATE_SHARE` of `memory`, data
    parallel across the groups (None memory, or no group small enough: every chip one FSDP group). Smaller
    groups gather weights over fewer chips, in larger pieces: on a v5p-64 (32 chips) the compiled 1024 px
    step at one sample per chip estimates 2.49 s on data=4,fsdp=8 against 5.73 s on fsdp=32. The per-chip
    batch's activations must fit in the rest: two 1024 px samples a chip on a v5e-256 (data=8,fsdp=32) need
    17.0 GB of the 16; there give the mesh (fsdp groups of 64) or one sample a chip (docs/scaling.md)."""
    if memory is not None:
        for g in fsdp_groups(n):
            if state_bytes / g <= TRAIN_STATE_SHARE * memory:
                return MeshConfig(data=n // g, fsdp=g)
    return MeshConfig(data=1, fsdp=n)


# --------------------------------------------------------------------------------------------------
# choices recorded by `jaxedit plan --mesh auto`


def record_path() -> Path:
    """$JAXEDIT_PLACEMENTS, else $XDG_CACHE_HOME/jaxedit/placements.json, else ~/.cache/jaxedit/..."""
    if os.environ.get("JAXEDIT_PLACEMENTS"):
        return Path(os.environ["JAXEDIT_PLACEMENTS"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxedit" / "placements.json"


@dataclasses.dataclass(frozen=True)
class Key:
    """What a recorded choice is for: the model (preset name and its transformer config), the weights'
    quantisation, the kind and number of chips."""

    preset: str
    quantize: str
    device_kind: str
    chips: int

    def text(self) -> str:
        return f"{self.preset}|{self.quantize}|{self.device_kind}|{self.chips}"


def key_for(preset, quantize: str | None, devices: Sequence) -> Key:
    return Key(f"{preset.name}:{hash_config(preset.transformer)}", quantize or "none", devices[0].device_kind,
               len(devices))  # fmt: skip


def hash_config(cfg) -> str:
    import hashlib

    return hashlib.sha256(repr(cfg).encode()).hexdigest()[:12]


def recorded(key: Key, path: Path | None = None) -> MeshConfig | None:
    """The mesh `jaxedit plan --mesh auto` recorded for `key` (None: none, or the file is unreadable)."""
    path = path or record_path()
    try:
        spec = json.loads(path.read_text()).get(key.text())
    except (OSError, ValueError, AttributeError):
        return None
    try:
        return MeshConfig.parse(spec["mesh"]) if isinstance(spec, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def record(key: Key, cfg: MeshConfig, detail: dict, path: Path | None = None) -> Path:
    """Keep `cfg` as the choice for `key` (beside the other keys; written beside, then renamed)."""
    path = path or record_path()
    try:
        table = json.loads(path.read_text())
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    table[key.text()] = {"mesh": text(cfg), **detail}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
