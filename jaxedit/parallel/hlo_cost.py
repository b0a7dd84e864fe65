"""The TPU compiler's own time estimate of a compiled program, with loops counted as often as they run.

`compiled.cost_analysis()` counts a while-loop body once (a 57-block scan costs as one block), and its
`optimal_seconds` is a roofline of that count. The TPU compiler also writes, into the optimized HLO
(`compiled.as_text()`), an `estimated_cycles` figure on every instruction it schedules (fusions,
copies, collective pieces). `program_cycles` walks the HLO from its entry computation:

    cycles(computation) = sum of its instructions' estimated_cycles
                        + sum over its `while` ops of trips x (cycles(body) + cycles(condition))
                        + the largest branch of each `conditional` (each branch's cost is kept:
                          `ProgramCycles.conditionals`), the callee of each `call`

where `trips` is the while op's `known_trip_count` when the compiler recorded one, else read from
its condition computation: `compare(counter, constant(N))` with direction LT (N trips; LE: N + 1),
the form `lax.scan` / `fori_loop` lower to (a counter from 0). A loop whose count cannot be read
is counted once and reported. Fused computations are not entered (the fusion op carries their cost).

Mosaic kernels (custom calls such as splash attention) carry no estimate; they are listed with how
often they run, and their FLOPs are estimated from their operand shapes (`kernel_flops`), to be
timed at the chip's peak.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", re.DOTALL)
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\([^)]*\)(?:T\([\d,]*\))?\)?)? \{([^}]*)\}")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result type text, e.g. "bf16[2,128,64]{...}" or a tuple
    opcode: str
    rest: str  # operands and attributes

    def attr(self, key: str) -> str | None:
        m = re.search(rf"{key}=%?([\w.\-]+)", self.rest)
        return m[1] if m else None


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: instructions}, entry computation name) of an HLO module's text."""
    comps: dict[str, list[Instruction]] = {}
    entry, current, lines = "", None, []

    def flush():
        for text in lines:  # an instruction may span lines (attributes holding JSON with newlines)
            m = _INSTRUCTION.match(text)
            if m:
                comps[current].append(Instruction(m[1], m[2], m[3], m[4]))
        lines.clear()

    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = m[1]
                comps[current] = []
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.rstrip() == "}":
            flush()
            current = None
        elif re.match(r"^\s*(?:ROOT )?%", line) or not lines:
            lines.append(line)
        else:
            lines[-1] += "\n" + line
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def trip_count(loop: Instruction, comps: dict[str, list[Instruction]]) -> int | None:
    """How often a while op runs its body (None: unknown)."""
    m = _TRIP.search(loop.rest)
    if m:
        return int(m[1])
    cond = comps.get(loop.attr("condition") or "", [])
    constants = {}
    for ins in cond:
        c = re.match(r"(-?\d+)\)", ins.rest) if ins.opcode == "constant" else None
        if c:
            constants[ins.name] = int(c[1])
    for ins in cond:
        if ins.opcode != "compare":
            continue
        operands = re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])
        direction = re.search(r"direction=(\w+)", ins.rest)
        bound = [constants[o] for o in operands if o in constants]
        if len(bound) == 1 and direction and operands[-1] in constants:
            return {"LT": bound[0], "LE": bound[0] + 1}.get(direction[1])
    return None


@dataclasses.dataclass
class ProgramCycles:
    cycles: int  # estimated cycles of one run of the program, loops counted as often as they run
    cycles_body_once: int  # the same with every loop body counted once
    kernels: Counter  # Mosaic kernel name -> times it runs
    kernel_flops: float  # estimated FLOPs of those runs (per device)
    unknown_loops: list[str]
    by_kind: Counter = dataclasses.field(default_factory=Counter)  # `kind` -> cycles (loops counted as they run)
    collective_bytes: Counter = dataclasses.field(default_factory=Counter)  # opcode -> bytes received per run
    largest: list = dataclasses.field(default_factory=list)  # (cycles, times, kind, instruction text), top 12
    # each `conditional` run inside the program: (times it runs, [cycles of one run of each branch]); the
    # program's figures count the largest branch every time (e.g. a step cache's `lax.cond`: computing or reusing)
    conditionals: list = dataclasses.field(default_factory=list)


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "f8e4m3fn": 1, "pred": 1, "s64": 8}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result type (a tuple, e.g. an async collective's (operand, result, ...): its largest
    element, the buffer the collective fills)."""
    return max([0] + [_bytes_of(m) for m in _SHAPE.findall(shape)])


def group_size(ins: Instruction) -> int:
    """The number of devices in each of a collective's replica groups (1 if it does not say)."""
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", ins.rest)
    if m:
        return len(m[1].split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", ins.rest)
    if m:
        return int(m[2])
    # replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2][, device_ids=(...)] {'axis_1'}: the named axes' sizes
    m = _MESH_GROUPS.search(ins.rest)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m[1])}
        n = 1
        for axis in re.findall(r"'([^']+)'", m[2]):
            n *= sizes.get(axis, 1)
        return n
    return 1


def received_bytes(ins: Instruction) -> float:
    """Bytes one device receives over the interconnect in a collective (ring algorithms): all-gather and
    all-to-all (g-1)/g of the result, reduce-scatter (g-1)/g of its operand (= (g-1) results), all-reduce
    2 (g-1)/g of the array, collective-permute the whole array."""
    op = ins.opcode.removesuffix("-start")
    g, size = group_size(ins), shape_bytes(ins.shape)
    if op == "collective-permute":
        return float(size)
    if g <= 1:
        return 0.0
    if op == "reduce-scatter":
        sizes = [b for b in (_bytes_of(x) for x in _SHAPE.findall(ins.shape)) if b]
        return float((g - 1) * min(sizes))
    return (2.0 if op == "all-reduce" else 1.0) * (g - 1) / g * size


def _bytes_of(match: tuple[str, str]) -> int:
    n = 1
    for d in filter(None, match[1].split(",")):
        n *= int(d)
    return n * _BYTES.get(match[0], 4)


def kind(ins: Instruction, comps: dict[str, list[Instruction]]) -> str:
    """What an instruction's cycles are spent on: matmul (a fusion or op holding a dot or convolution),
    collective (its opcode or a fusion holding one), copy (copies and transposes), reduction, elementwise
    (the other fusions), host (host transfers), other."""
    op = ins.opcode.removesuffix("-start").removesuffix("-done")
    if op in COLLECTIVES:
        return "collective"
    if op in ("dot", "convolution"):
        return "matmul"
    if op in ("copy", "transpose"):
        return "copy"
    if op in ("send", "recv", "infeed", "outfeed"):
        return "host"
    if op == "fusion":
        called = comps.get(ins.attr("calls") or "", [])
        ops = {c.opcode for c in called}
        if ops & {"dot", "convolution"}:
            return "matmul"
        if any(o.removesuffix("-start") in COLLECTIVES for o in ops):
            return "collective"
        plumbing = {"copy", "transpose", "bitcast", "parameter", "tuple", "get-tuple-element"}
        if ops <= plumbing and ops & {"copy", "transpose"}:
            return "copy"
        if ops & {"reduce", "reduce-window"}:
            return "reduction"
        return "elementwise"
    return "other"


def program_cycles(hlo_text: str) -> ProgramCycles:
    """Walk the compiled program's HLO (see the module docstring)."""
    comps, entry = parse(hlo_text)
    shapes = {ins.name: ins.shape for body in comps.values() for ins in body}
    kernels: Counter = Counter()
    flops = [0.0]
    unknown: list[str] = []
    by_kind: Counter = Counter()
    moved: Counter = Counter()
    largest: list = []
    conditionals: list = []

    def walk(name: str, times: int, once: bool, record: bool = True) -> int:
        """Cycles of one run of computation `name`, which runs `times` times in all; record: also count its
        instructions into the program's breakdowns (False: the cost alone)."""
        total = 0
        for ins in comps.get(name, []):
            m = _CYCLES.search(ins.rest)
            total += int(m[1]) if m else 0
            if not once and record:
                k = kind(ins, comps)
                if m:
                    by_kind[k] += times * int(m[1])
                    largest.append((times * int(m[1]), times, k, f"{ins.name} = {ins.shape} {ins.opcode}"))
                for c in [ins, *comps.get(ins.attr("calls") or "", [])] if ins.opcode == "fusion" else [ins]:
                    op = c.opcode.removesuffix("-start")
                    if op in COLLECTIVES and not c.opcode.endswith("-done"):
                        moved[op] += times * received_bytes(c)
            if ins.opcode == "while":
                n = trip_count(ins, comps)
                if n is None:
                    n = 1
                    if not once:
                        unknown.append(ins.name)
                n = 1 if once else n
                for part in ("body", "condition"):
                    total += n * walk(ins.attr(part) or "", times * n, once, record)
            elif ins.opcode == "call":
                total += walk(ins.attr("to_apply") or "", times, once, record)
            elif ins.opcode == "conditional":
                branches = re.findall(r"%([\w.\-]+)", ins.rest.split("branch_computations={")[-1].split("}")[0])
                costs = [walk(b, times, once, record=False) for b in branches]
                if costs:  # the largest branch counted (and broken down) as if it ran every time
                    total += walk(branches[costs.index(max(costs))], times, once, record)
                    if record and not once:
                        conditionals.append((times, costs))
            elif (ins.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in ins.rest and not once
                  and record):  # fmt: skip
                kernel = re.sub(r"\.\d+$", "", ins.name)
                kernels[kernel] += times
                flops[0] += times * kernel_flops(kernel, ins, shapes)
        return total

    cycles = walk(entry, 1, once=False)
    top = sorted(largest, key=lambda x: -x[0])[:12]
    return ProgramCycles(cycles, walk(entry, 1, once=True), kernels, flops[0], unknown, by_kind, moved, top,
                         conditionals)  # fmt: skip


def kernel_flops(kernel: str, ins: Instruction, shapes: dict[str, str]) -> float:
    """FLOPs of one run of a splash attention kernel from its q, k operands [b, h, L, D] (0 for other
    kernels): forward 4 b h Lq Lk D (q k^T and p v), backward dq 6 and dkv 8 (logits recomputed, then
    the products each gradient needs)."""
    mult = 8 if "dkv" in kernel else 6 if "_dq" in kernel else 4 if "fwd" in kernel else 0
    if not mult or "splash" not in kernel:
        return 0.0
    operands = re.findall(r"%([\w.\-]+)", ins.rest.split("),")[0])
    dims = []
    for o in operands:
        m = _SHAPE.match(shapes.get(o, ""))
        d = [int(x) for x in m[2].split(",")] if m and m[2] else []
        if len(d) >= 3 and m[1] in ("bf16", "f32", "f16"):
            dims.append(d)
    if len(dims) < 2:
        return 0.0
    q, k = dims[0], dims[1]
    lead = 1
    for x in q[:-2]:
        lead *= x
    return float(mult * lead * q[-2] * k[-2] * q[-1])
