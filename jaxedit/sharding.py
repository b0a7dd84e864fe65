"""Logical axis names carried by parameters and activations.

Modules name each parameter axis with a logical name (`nn.with_logical_partitioning`);
a rule table maps logical names to mesh axes. Model code never names a mesh axis.

Logical names used by the models:
  layers     leading axis of scanned (stacked) block parameters
  embed      model width (hidden size)
  heads      attention heads (fused heads x head_dim axes as well, head-major)
  head_dim   per-head features (QK-norm scales)
  qkv        the 3 of a fused q/k/v projection
  mlp        MLP hidden width
  mod        modulation outputs (chunks of shift/scale/gate)
  in         input features of an embedding projection (latent patch, text, pooled)
"""

from __future__ import annotations

import flax.linen as nn
import jax

# Logical name -> mesh axes. Filled out by the sharding work (issue 6); the default
# keeps everything replicated so single-device use needs no mesh.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("mod", None),
    ("in", None),
)


def param_init(init: nn.initializers.Initializer, names: tuple[str | None, ...]):
    """An initializer whose parameter carries logical axis `names`."""
    return nn.with_logical_partitioning(init, names)


def unbox(tree):
    """Strip logical-partitioning boxes: the plain parameter pytree."""
    return nn.meta.unbox(tree)


def logical_specs(boxed_tree) -> jax.tree_util.PyTreeDef:
    """Logical PartitionSpecs of a boxed (init or eval_shape) parameter tree."""
    return nn.get_partition_spec(boxed_tree)
