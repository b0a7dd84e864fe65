"""Multi-host start-up: `jax.distributed` from environment variables.

On TPU pods and managed clusters `jax.distributed.initialize()` finds the coordinator by
itself. Elsewhere set JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID on every process. On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_from_env(*, auto: bool = False) -> bool:
    """Initialise jax.distributed if the environment asks for it; returns True if it did.

    auto=True also calls the argument-free auto-detection (TPU pods, SLURM, ...) when the
    variables are absent. A half-set environment raises, naming the missing variables.
    """
    given = {k: os.environ.get(k) for k in _ENV}
    if not any(given.values()):
        if auto:
            jax.distributed.initialize()
            return True
        return False
    missing = [k for k, v in given.items() if not v]
    if missing:
        raise RuntimeError(f"multi-process run: {', '.join(missing)} not set (need all of {', '.join(_ENV)})")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=given["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(given["JAX_NUM_PROCESSES"]),
        process_id=int(given["JAX_PROCESS_ID"]),
    )
    return True


def global_array(host_array, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global jax.Array from a host array every process holds in full (each process
    contributes only its addressable shards)."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


def put_global(tree, shardings):
    """`jax.device_put(tree, shardings)` for values every process holds in full (numpy or
    single-device arrays, e.g. weights each process read from the model folder).

    With several processes jax.device_put refuses a committed single-device array for a sharding
    that spans processes; here each process contributes its addressable shards of its own copy."""

    def put(x, sharding):
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        return global_array(x, sharding)

    return jax.tree.map(put, tree, shardings)


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
