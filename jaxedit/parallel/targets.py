"""Accelerator targets by their public names, their chips as devices to compile for ahead of time.

    target = parse_target("v5p-8")      # Target(generation='v5p', chips=4, topology='v5p:2x2x1')
    devices = target.devices()          # TPU device descriptions (libtpu), no TPU attached

`jax.experimental.topologies.get_topology_desc` gives a slice's chips as devices; a `Mesh` over them
plus `jax.ShapeDtypeStruct`s with `NamedSharding`s make `jax.jit(f).lower(...).compile()` run the real
TPU compiler on any host (`pip install "jax[tpu]==<jax version>"` brings libtpu). Slice names follow
Cloud TPU: v4 and v5p count TensorCores (2 per chip: v5p-8 is 4 chips), v5e and v6e count chips.

NVIDIA GPUs (h100-8: 8 H100 80GB) compile the same way, deviceless, when the CUDA PJRT plugin and cuDNN
are installed (`pip install ".[gpu-plan]"`: jax-cuda12-plugin, jax-cuda12-pjrt, nvidia-cudnn-cu12; no
driver or GPU needed): the devices come from a GPU target description (`GPU_TARGET_CONFIGS`, the chip's
published figures in XLA's `GpuTargetConfigProto` text format).
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
    cores_per_chip: int  # what the slice name counts: TensorCores (v4, v5p) or chips (v5e, v6e, GPUs)
    dims: int  # torus dimensions of a slice's topology name (3: v4, v5p; 2: v5e, v6e; 0: GPUs)
    platform: str = "tpu"
    ici_bytes_per_s: float = 0.0  # per chip, all links (Cloud TPU's published inter-chip interconnect figure)


GENERATIONS = {
    g.name: g
    for g in (
        Generation("v4", 32e9, 275e12, 2, 3, ici_bytes_per_s=2400e9 / 8),
        Generation("v5e", 16e9, 197e12, 1, 2, ici_bytes_per_s=1600e9 / 8),
        Generation("v5p", 95e9, 459e12, 2, 3, ici_bytes_per_s=4800e9 / 8),
        Generation("v6e", 32e9, 918e12, 1, 2, ici_bytes_per_s=3584e9 / 8),
        Generation("h100", 80e9, 989e12, 1, 0, "gpu"),  # H100 SXM, dense bf16
    )
}
# XLA's GpuTargetConfigProto of each GPU (figures of the chip: SMs, clock, memory, bandwidth, caches)
GPU_TARGET_CONFIGS = {
    "h100": """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice or a set of GPUs: generation, chip count and topology (as `get_topology_desc` takes it)."""

    generation: Generation
    chips: int  # per slice
    topology: str
    name: str
    slices: int = 1  # TPU slices joined by the data-center network (multi-slice: mesh axes dcn_*)

    @property
    def total_chips(self) -> int:
        return self.chips * self.slices

    @property
    def hbm_bytes(self) -> float:
        return self.generation.hbm_bytes

    @property
    def peak_flops(self) -> float:
        """Dense bf16 FLOP/s of all the chips."""
        return self.generation.peak_bf16_flops * self.total_chips

    def devices(self) -> list:
        """The slice's chips as device descriptions to compile for (libtpu, or the CUDA plugin; nothing runs)."""
        from jax.experimental import topologies

        if self.generation.platform == "gpu":
            try:
                config = GPU_TARGET_CONFIGS[self.generation.name]
                return list(
                    topologies.get_topology_desc(platform="cuda", target_config=config, topology=self.topology).devices
                )
            except Exception as e:  # noqa: BLE001 - a missing plugin surfaces as various error types
                raise RuntimeError(
                    f"cannot describe {self.name} ({type(e).__name__}: {str(e).splitlines()[0]}); compiling for "
                    'NVIDIA GPUs without one needs the CUDA PJRT plugin and cuDNN: pip install ".[gpu-plan]"'
                ) from None
        # compile-only: nothing touches a TPU, so other processes (tests, another planner) may load libtpu too
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        kw = {"chips_per_host_bounds": [1, 1, 1]} if self.chips == 1 else {}
        if self.slices > 1:
            kw["num_slices"] = self.slices
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
        if gen in GENERATIONS and GENERATIONS[gen].platform == "gpu":  # n GPUs, 8 per host
            n = int(m[2])
            if n <= 8 or n % 8 == 0:
                return Target(GENERATIONS[gen], n, f"1x{max(n // 8, 1)}x{min(n, 8)}", name)
        elif gen in GENERATIONS:
            g, n = GENERATIONS[gen], int(m[2])
            if n % g.cores_per_chip == 0:
                shape = torus(n // g.cores_per_chip, g.dims)
                return Target(g, math.prod(shape), f"{gen}:{'x'.join(map(str, shape))}", name)
    known = ", ".join(sorted(GENERATIONS))
    raise ValueError(
        f"target {name!r}: expected a TPU slice such as v5p-8, v6e-64, v5e-256, a topology such as v5p:2x2x1, "
        f"or GPUs such as h100-8 (generations {known})"
    )
