"""Meshes, logical axis names and the one rule table that maps them to mesh axes.

Modules name each parameter axis with a logical name (`param_init`) and constrain their
main activations (`constrain`); the rule table below maps logical names to the mesh axes
`data`, `fsdp`, `tensor`. FSDP, data parallel and tensor parallel are chosen by the mesh
shape alone: a mesh axis of size 1 shards nothing. Model code never names a mesh axis.

Parameter logical names:
  layers     leading axis of scanned (stacked) block parameters
  embed      model width (hidden size)                         -> fsdp
  embed_out  second width axis of a square [D, D] projection   -> tensor
  heads      attention heads (fused heads x head_dim, head-major) -> tensor
  head_dim   per-head features (QK-norm scales)
  qkv        the 3 of a fused q/k/v projection
  mlp        MLP hidden width                                  -> tensor
  mod        modulation outputs (chunks of shift/scale/gate)   -> tensor
  in         input features of an embedding projection (latent patch, text, pooled)
  vocab      rows of a token embedding table (text encoders)
  conv_in    input channels of a VAE conv / attention kernel (replicated: the VAE is 84M params)
  conv_out   output channels of a VAE conv / attention kernel and its bias (replicated)
  channels   VAE GroupNorm scale / bias (replicated)
Activation logical names: act_batch (-> data, fsdp), act_length, act_embed, act_heads
(-> tensor), act_mlp (-> tensor).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxedit.configs import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", None),  # GQA's few key/value heads (Qwen2.5-VL-7B: 4): replicated over tensor, split by fsdp
    ("head_dim", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("mod", "tensor"),
    ("in", None),
    ("vocab", None),
    ("conv_in", None),  # VAE
    ("conv_out", None),
    ("channels", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices, all on fsdp)."""
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1)
    n_per_slice = len(devices) // math.prod(dcn)
    ici = ici_sizes(cfg, n_per_slice, str(cfg))
    if math.prod(ici) * math.prod(dcn) != len(devices):
        raise ValueError(f"{cfg}: mesh {ici} x dcn {list(dcn)} does not use exactly the {len(devices)} devices")
    if math.prod(dcn) > 1:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        arr = physical_mesh(ici, devices, cfg)
    return Mesh(arr, MESH_AXES)


def ici_sizes(cfg: MeshConfig, n: int, name: str) -> list[int]:
    """[data, fsdp, tensor] of `cfg` within one slice of `n` devices, an axis of size -1 given the devices left
    over (ValueError "NAME: ..." if there are two, or they do not divide)."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"{name}: at most one axis may be -1")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if n % rest:
            raise ValueError(f"{name}: {n} devices per slice are not divisible by {rest}")
        sizes[sizes.index(-1)] = n // rest
    return sizes


def physical_mesh(shape: list[int], devices: list, cfg: MeshConfig) -> np.ndarray:
    """The devices laid out in `shape` following their physical topology (ICI rings on TPU). If that
    fails: CPU devices have no topology, so a plain reshape; TPU devices raise (a mesh that ignores
    the torus runs its collectives over far links); other accelerators warn and reshape."""
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        platforms = {d.platform for d in devices}
        if platforms == {"cpu"}:
            return np.asarray(devices).reshape(shape)
        problem = (
            f"mesh {cfg} ({shape}) does not fit the topology of these {len(devices)} {'/'.join(platforms)} devices"
        )
        if "tpu" in platforms:
            try:
                return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            except (ValueError, NotImplementedError, AssertionError):
                pass
            raise ValueError(f"{problem}: {e}; choose axis sizes that tile the slice's physical axes") from None
        warnings.warn(f"{problem} ({e}); laying the devices out in id order instead", stacklevel=3)
        return np.asarray(devices).reshape(shape)


def param_init(init: nn.initializers.Initializer, names: tuple[str | None, ...]):
    """An initializer whose parameter carries logical axis `names`."""
    return nn.with_logical_partitioning(init, names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside a mesh + rules context)."""
    return nn.with_logical_constraint(x, names)


def unbox(tree):
    """Strip logical-partitioning boxes: the plain parameter pytree."""
    return nn.meta.unbox(tree)


def logical_specs(boxed_tree):
    """Logical PartitionSpecs of a boxed (init or eval_shape) parameter tree."""
    return nn.get_partition_spec(boxed_tree)


def mesh_specs(boxed_tree, rules: Rules = DEFAULT_RULES):
    """Mesh PartitionSpecs of a boxed parameter tree under `rules`."""
    return nn.logical_to_mesh(logical_specs(boxed_tree), rules)


def shardings(boxed_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings (same tree structure as the unboxed parameters)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        mesh_specs(boxed_tree, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def abstract_with_shardings(boxed_tree, mesh: Mesh, rules: Rules = DEFAULT_RULES, dtype=None):
    """ShapeDtypeStructs carrying their target sharding (for sharded restore / AOT compile)."""
    shapes = unbox(boxed_tree)
    out = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        shardings(boxed_tree, mesh, rules),
    )
    if dtype is None:
        return out
    from jaxedit.quant import cast  # quantised kernels and their scales keep their dtypes

    return cast(out, dtype)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an input whose first axis is the batch (rest replicated)."""
    spec = nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Trace/compile under `mesh` with `rules` (activation constraints take effect)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def effective_spec(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """`spec` without mesh axes of size 1 (they shard nothing)."""

    def keep(entry):
        if entry is None:
            return None
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if mesh.shape[n] > 1)
        return None if not names else names[0] if len(names) == 1 else names

    return PartitionSpec(*(keep(e) for e in spec))
