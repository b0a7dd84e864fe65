"""Accelerator targets: TPU slices by their public names, their chips as devices to compile for ahead of time.

    target = parse_target("v5p-8")      # Target(generation='v5p', chips=4, topology='v5p:2x2x1')
    devices = target.devices()          # TPU device descriptions (libtpu), no TPU attached

`jax.experimental.topologies.get_topology_desc` gives a slice's chips as devices; a `Mesh` over them
plus `jax.ShapeDtypeStruct`s with `NamedSharding`s make `jax.jit(f).lower(...).compile()` run the real
TPU compiler on any host (`pip install "jax[tpu]==<jax version>"` brings libtpu). Slice names follow
Cloud TPU: v4 and v5p count TensorCores (2 per chip: v5p-8 is 4 chips), v5e and v6e count chips.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str
    hbm_bytes: float  # per chip
    peak_bf16_flops: float  # per chip, dense
    cores_per_chip: int  # what the slice name counts: TensorCores (v4, v5p) or chips (v5e, v6e)
    dims: int  # torus dimensions of a slice's topology name (3: v4, v5p; 2: v5e, v6e)


GENERATIONS = {
    g.name: g
    for g in (
        Generation("v4", 32e9, 275e12, 2, 3),
        Generation("v5e", 16e9, 197e12, 1, 2),
        Generation("v5p", 95e9, 459e12, 2, 3),
        Generation("v6e", 32e9, 918e12, 1, 2),
    )
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice: its generation, chip count and topology name (as `get_topology_desc` takes it)."""

    generation: Generation
    chips: int
    topology: str
    name: str

    @property
    def hbm_bytes(self) -> float:
        return self.generation.hbm_bytes

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s of the whole slice."""
        return self.generation.peak_bf16_flops * self.chips

    def devices(self) -> list:
        """The slice's chips as TPU device descriptions (needs libtpu; nothing runs on them)."""
        try:
            from jax.experimental import topologies
        except ImportError as e:  # pragma: no cover - jax always has it
            raise RuntimeError(f"jax.experimental.topologies is unavailable: {e}") from None
        # compile-only: nothing touches a TPU, so other processes (tests, another planner) may load libtpu too
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        kw = {"chips_per_host_bounds": [1, 1, 1]} if self.chips == 1 else {}
        try:
            return list(topologies.get_topology_desc(platform="tpu", topology_name=self.topology, **kw).devices)
        except Exception as e:  # noqa: BLE001 - missing libtpu surfaces as various error types
            raise RuntimeError(
                f"cannot describe TPU topology {self.topology} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                'compiling for TPU needs libtpu: pip install "jax[tpu]==<your jax version>"'
            ) from None


def torus(chips: int, dims: int) -> tuple[int, ...]:
    """The topology of a slice of `chips` chips: powers of two, as even as possible, smaller sides first and
    sides of 1 last (4 -> 2x2x1 / 2x2, 32 -> 2x4x4 / 4x8, 256 -> 4x8x8 / 16x16)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips: slices have a power-of-two number of chips")
    k = chips.bit_length() - 1
    sides = [2 ** (k // dims + (i >= dims - k % dims)) for i in range(dims)]
    return tuple([s for s in sides if s > 1] + [s for s in sides if s == 1])


_SLICE = re.compile(r"^([a-z0-9]+)-(\d+)$")
_TOPOLOGY = re.compile(r"^([a-z0-9]+)[:=_]([0-9x]+)$")


def parse_target(name: str) -> Target:
    """A slice by public name (v5p-8, v5p-64, v6e-4, v6e-64, v5e-16, v5e-256, v4-8, v5litepod-16) or by
    topology (v5p:2x2x1, v6e:8x8). ValueError naming the accepted forms otherwise."""
    text = name.strip().lower()
    if m := _TOPOLOGY.match(text):
        gen, shape = ALIASES.get(m[1], m[1]), tuple(int(x) for x in m[2].split("x"))
        if gen in GENERATIONS:
            return Target(GENERATIONS[gen], math.prod(shape), f"{gen}:{m[2]}", name)
    elif m := _SLICE.match(text):
        gen = ALIASES.get(m[1], m[1])
        if gen in GENERATIONS:
            g, n = GENERATIONS[gen], int(m[2])
            if n % g.cores_per_chip == 0:
                shape = torus(n // g.cores_per_chip, g.dims)
                return Target(g, math.prod(shape), f"{gen}:{'x'.join(map(str, shape))}", name)
    known = ", ".join(sorted(GENERATIONS))
    raise ValueError(
        f"target {name!r}: expected a TPU slice such as v5p-8, v6e-64, v5e-256 (generations {known}) "
        f"or a topology such as v5p:2x2x1"
    )
