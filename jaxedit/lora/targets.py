"""Where a torch Linear of a LoRA file sits in our parameters: module names -> `Update`s.

Our parameter names are the reference's (BFL for the transformer, transformers' for CLIP and T5), so a
module name maps onto a kernel by the path: `double_blocks.3.img_attn.qkv` is row 3 of the stacked
`double_blocks/img_attn/qkv/kernel`, `encoder.block.0.layer.1.DenseReluDense.wi_0` is row 0 of
`block/layer_1/DenseReluDense/wi_0/kernel`. Three places differ (jaxedit/models/flux.py): fused q/k/v
kernels are [D, 3, H*Dh] (a torch row i*H*Dh + j is output (i, j)); single-block `linear1` is
`linear1_qkv` | `linear1_mlp` along the outputs and `linear2` is `linear2_attn` over `linear2_mlp`
along the inputs. diffusers' module names map onto BFL's, with the rows they cover (its to_q / to_k /
to_v are the thirds of BFL's fused qkv, proj_mlp the MLP rows of linear1, and norm_out.linear is
final_layer.adaLN_modulation.1 with its two halves swapped). This is the correspondence of
checkpoints_convert's key tables (`flux.bfl_rules`, `flux.diffusers_rules`, `text.clip_rules`,
`text.t5_rules`), which the library cannot import (imports run one way): tests/test_lora_formats.py
checks that a LoRA on every Linear lands where those tables put the same weights, kernel by kernel.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxedit.lora.apply import Update
from jaxedit.lora.formats import LoraError, Term

# diffusers module under a block -> (BFL module under the block, index into SPLITS[that module] or None: all rows)
DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
DIFFUSERS_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (scale, shift) halves; BFL: (shift, scale)
}
SWAPPED_HALVES = {"norm_out.linear"}
# single-block linears that are two kernels here: (axis they sit side by side on, kernels in order)
FUSED = {"linear1": ("out", ("linear1_qkv", "linear1_mlp")), "linear2": ("in", ("linear2_attn", "linear2_mlp"))}
BLOCKS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}
_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")
_HF = {
    "clip": (re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)"), "layers/{}"),
    "t5": (re.compile(r"encoder\.block\.(\d+)\.layer\.(\d+)\.(.+)"), "block/layer_{}/{}"),
}


@dataclasses.dataclass(frozen=True)
class Piece:
    """The part of a torch weight [out, in] one kernel holds: its rows and columns, at `layer` of a stacked
    kernel (None: not stacked); out_shape: the kernel's output axes."""

    param: str
    layer: int | None
    rows: tuple[int, int]
    cols: tuple[int, int]
    out_shape: tuple[int, ...]


def _kernel(shapes: dict, path: str, stacked: bool) -> tuple[int, tuple[int, ...]] | None:
    """(inputs, output axes) of a kernel, None if there is no such kernel."""
    shape = shapes.get(path)
    if shape is None or len(shape) < 2 + stacked:
        return None
    core = shape[1:] if stacked else shape
    return core[0], tuple(core[1:])


def _pieces(shapes: dict, block: str | None, layer: int | None, names: tuple[str, ...], axis: str):
    """Pieces of kernels `names` under `block`, side by side along `axis` of the torch weight."""
    pieces, start = [], 0
    for name in names:
        path = f"{block}/{name}/kernel" if block else f"{name}/kernel"
        k = _kernel(shapes, path, layer is not None)
        if k is None or (layer is not None and layer >= shapes[path][0]):
            return None
        n_in, out = k
        n_out = math.prod(out)
        rows, cols = ((start, start + n_out), (0, n_in)) if axis == "out" else ((0, n_out), (start, start + n_in))
        start += n_out if axis == "out" else n_in
        pieces.append(Piece(path, layer, rows, cols, out))
    return pieces


def bfl_pieces(shapes: dict, module: str) -> list[Piece] | None:
    """Our kernels holding BFL's transformer module `module` (e.g. `single_blocks.3.linear1`), None if none."""
    m = _BLOCK.fullmatch(module)
    block, layer, rest = (m[1], int(m[2]), m[3]) if m else (None, None, module)
    if block is None and rest.split(".")[0] in ("double_blocks", "single_blocks"):
        return None  # a stacked kernel named without its layer
    axis, names = FUSED[rest] if block == "single_blocks" and rest in FUSED else ("out", (rest.replace(".", "/"),))
    return _pieces(shapes, block, layer, names, axis)


def hf_pieces(part: str, shapes: dict, module: str) -> list[Piece] | None:
    """Our kernel holding a transformers CLIP / T5 module (e.g. `text_model.encoder.layers.0.mlp.fc1`)."""
    pattern, template = _HF[part]
    m = pattern.fullmatch(module)
    if not m:
        return None
    layer, *where = m.groups()
    return _pieces(shapes, None, int(layer), (template.format(*where[:-1], where[-1].replace(".", "/")),), "out")


def diffusers_to_bfl(module: str, h: int, mlp: int) -> tuple[str, list[tuple[int, int, int]]] | None:
    """A diffusers transformer module -> (BFL module, [(diffusers row, BFL row, rows)] segments), None if unknown.
    h: hidden size, mlp: MLP width."""
    splits = {"img_attn.qkv": (h, h, h), "txt_attn.qkv": (h, h, h), "linear1": (h, h, h, mlp)}
    m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if m:
        table = DIFFUSERS_DOUBLE if m[1] == "transformer_blocks" else DIFFUSERS_SINGLE
        if m[3] not in table:
            return None
        bfl, index = table[m[3]]
        bfl = f"{BLOCKS[m[1]]}.{m[2]}.{bfl}"
        if index is None:
            return bfl, []  # every row, in order
        sizes = splits[table[m[3]][0]]
        return bfl, [(0, sum(sizes[:index]), sizes[index])]
    if module not in DIFFUSERS_GLOBAL:
        return None
    if module in SWAPPED_HALVES:
        return DIFFUSERS_GLOBAL[module], [(0, h, h), (h, 0, h)]
    return DIFFUSERS_GLOBAL[module], []


def module_names(part: str, naming: str, shapes: dict) -> list[str]:
    """Every Linear module name of a part whose kernels are `shapes` ({path: shape}), in `naming`."""
    kernels = [p.removesuffix("/kernel") for p in shapes if p.endswith("/kernel")]
    names = []
    if part == "transformer" and naming == "bfl":
        fused = {k: f for f, (_, ks) in FUSED.items() for k in ks}
        for k in kernels:
            block, _, rest = k.partition("/")
            if block in ("double_blocks", "single_blocks"):
                rest = fused.get(rest, rest) if block == "single_blocks" else rest
                names += [f"{block}.{i}.{rest.replace('/', '.')}" for i in range(shapes[k + "/kernel"][0])]
            else:
                names.append(k.replace("/", "."))
        return sorted(set(names))
    if part == "transformer":  # diffusers: the names whose BFL module exists
        layers = {b: shapes[f"{b}/img_mod/lin/kernel" if b == "double_blocks" else f"{b}/modulation/lin/kernel"][0]
                  for b in BLOCKS.values()}  # fmt: skip
        for theirs, ours in BLOCKS.items():
            table = DIFFUSERS_DOUBLE if ours == "double_blocks" else DIFFUSERS_SINGLE
            names += [f"{theirs}.{i}.{n}" for i in range(layers[ours]) for n in table]
        names += [n for n, bfl in DIFFUSERS_GLOBAL.items() if bfl_pieces(shapes, bfl)]
        return names
    for k in kernels:
        block, _, rest = k.partition("/")
        for i in range(shapes[k + "/kernel"][0]):
            if part == "clip":
                names += [f"text_model.encoder.layers.{i}.{rest.replace('/', '.')}"]
            else:
                j, _, rest2 = rest.removeprefix("layer_").partition("/")
                names += [f"encoder.block.{i}.layer.{j}.{rest2.replace('/', '.')}"]
    return names


def kohya_table(part: str, naming: str, shapes: dict) -> dict[str, str]:
    """{module name with dots spelt "_": module name} (kohya's names; CLIP also without `text_model.`)."""
    names = module_names(part, naming, shapes)
    if part == "clip":
        names += [n.removeprefix("text_model.") for n in names]
    table = {n.replace(".", "_"): n for n in names}
    assert len(table) == len(names), f"kohya names of the {part} collide"
    return table


def _box(lo: int, hi: int, out_shape: tuple[int, ...], what: str) -> tuple[tuple[int, int], ...]:
    """Torch rows [lo, hi) of a kernel with output axes `out_shape` as a box on those axes."""
    inner = math.prod(out_shape[1:])
    if lo % inner or hi % inner:
        raise LoraError(f"{what}: rows {lo}:{hi} are not whole slices of the kernel's outputs {out_shape}")
    return ((lo // inner, hi // inner), *((0, n) for n in out_shape[1:]))


def updates(terms: list[Term], part: str, shapes: dict, file: Path, *, hidden: int = 0, mlp: int = 0):
    """The `Update`s of one part from its terms (float32 numpy factors, scale folded into b); LoraError naming
    the file and the key for a module the part does not have or factors whose shapes do not fit it.
    hidden, mlp: the transformer's hidden size and MLP width (diffusers names)."""
    groups: dict[tuple[str, tuple], dict[int | None, list]] = defaultdict(lambda: defaultdict(list))
    for t in terms:
        where = f"{file}: key {t.key}"
        segments = []
        if t.naming == "diffusers":
            found = diffusers_to_bfl(t.module, hidden, mlp)
            module, segments = found if found else (None, [])
        else:
            module = t.module
        pieces = None
        if module is not None:
            pieces = hf_pieces(part, shapes, module) if t.naming == "hf" else bfl_pieces(shapes, module)
        if not pieces:
            raise LoraError(f"{where}: the model's {part} has no Linear {t.module!r} ({t.naming} name)")
        n_in, n_out = max(p.cols[1] for p in pieces), max(p.rows[1] for p in pieces)
        segments = segments or [(0, 0, n_out)]
        rows = sum(n for _, _, n in segments)
        if t.down.shape[1] != n_in or t.up.shape[0] != rows:
            raise LoraError(f"{where}: factors down {list(t.down.shape)}, up {list(t.up.shape)} do not fit "
                            f"{t.module} (in {n_in}, out {rows}) at rank {t.down.shape[0]}")  # fmt: skip
        for p in pieces:
            a = t.down[:, p.cols[0] : p.cols[1]].T
            for src, dst, n in segments:
                lo, hi = max(dst, p.rows[0]), min(dst + n, p.rows[1])
                if lo >= hi:
                    continue
                box = _box(lo - p.rows[0], hi - p.rows[0], p.out_shape, where)
                b = (np.float32(t.scale) * t.up[src + lo - dst : src + hi - dst]).T
                groups[p.param, box][p.layer].append((a, b.reshape(b.shape[0], *(e - s for s, e in box))))
    out = []
    for (param, box), by_layer in groups.items():
        shape, box_shape = shapes[param], tuple(e - s for s, e in box)
        r = max(sum(a.shape[1] for a, _ in ab) for ab in by_layer.values())
        if None in by_layer:  # not stacked: one matrix
            a, b = (np.concatenate(x, axis=i) for x, i in zip(zip(*by_layer[None]), (1, 0)))
            out.append(Update(param, box, np.ascontiguousarray(a), np.ascontiguousarray(b)))
            continue
        a = np.zeros((shape[0], shape[1], r), np.float32)  # layers the file leaves out: zero
        b = np.zeros((shape[0], r, *box_shape), np.float32)
        for layer, ab in by_layer.items():
            k = sum(x.shape[1] for x, _ in ab)
            a[layer, :, :k] = np.concatenate([x for x, _ in ab], axis=1)
            b[layer, :k] = np.concatenate([y for _, y in ab], axis=0)
        out.append(Update(param, box, a, b))
    return tuple(sorted(out, key=lambda u: (u.param, u.box)))
