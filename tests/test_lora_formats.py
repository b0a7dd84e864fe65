"""Community LoRA files (jaxedit.lora) against diffusers' own loader, and the loader's strictness.

Each layout diffusers' `FluxKontextPipeline.load_lora_weights` reads gets a random LoRA written with its
keys for a tiny random diffusers transformer (+ CLIP); diffusers loads it (adapters active, then
`fuse_lora`) and we read the same file: transformer (and CLIP) outputs agree in float32, merged and at
run time, also with two LoRAs at scales 0.7 and 0.4. Where diffusers cannot read a layout at tiny sizes
(BFL `lora_A` names: it reads those only for the full 19+38-block model; kohya's single-block linear1:
its converter hard-codes the full model's widths), the reference is the same LoRA in diffusers' own
names, split the way its converters split it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from jaxedit import presets
from jaxedit.lora import LoraError, merge, merge_now, parse_lora_arg, read_lora
from tests.helpers import lora_refusal, rel_err

PRESET = presets.get("flux-kontext-tiny")
CFG = PRESET.transformer
H, M = CFG.hidden_size, CFG.mlp_hidden_dim
RESULTS: dict[str, str] = {}  # printed by the last test: the parity figures per layout


def bfl_linears(cfg=CFG) -> dict[str, tuple[int, int]]:
    """BFL module -> torch weight shape [out, in]."""
    h, m, out = cfg.hidden_size, cfg.mlp_hidden_dim, {}
    blocks = {"attn.qkv": (3 * h, h), "attn.proj": (h, h), "mlp.0": (m, h), "mlp.2": (h, m), "mod.lin": (6 * h, h)}
    for i in range(cfg.depth):
        out |= {f"double_blocks.{i}.{s}_{k}": v for s in ("img", "txt") for k, v in blocks.items()}
    single = {"linear1": (3 * h + m, h), "linear2": (h, h + m), "modulation.lin": (3 * h, h)}
    for i in range(cfg.depth_single_blocks):
        out |= {f"single_blocks.{i}.{k}": v for k, v in single.items()}
    for e, n_in in (("time_in", 256), ("vector_in", cfg.vec_in_dim), ("guidance_in", 256)):
        out |= {f"{e}.in_layer": (h, n_in), f"{e}.out_layer": (h, h)}
    out |= {"img_in": (h, cfg.in_channels), "txt_in": (h, cfg.context_in_dim)}
    return out | {"final_layer.linear": (cfg.out_channels, h), "final_layer.adaLN_modulation.1": (2 * h, h)}


# BFL -> diffusers, as diffusers' converters (`_convert_bfl_flux_control_lora_to_diffusers`,
# `_convert_kohya_flux_lora_to_diffusers`) name and split them: [(diffusers module, BFL rows)]
def bfl_to_diffusers(module: str) -> list[tuple[str, slice]]:
    parts = module.split(".")
    if parts[0] in ("double_blocks", "single_blocks"):
        i, rest = parts[1], ".".join(parts[2:])
        if parts[0] == "double_blocks":
            pre = f"transformer_blocks.{i}."
            if rest.endswith("attn.qkv"):
                names = (
                    ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
                )
                return [(f"{pre}attn.{n}", slice(j * H, (j + 1) * H)) for j, n in enumerate(names)]
            ff = "ff" if rest.startswith("img") else "ff_context"
            table = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                     "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                     f"{rest[:3]}_mlp.0": f"{ff}.net.0.proj", f"{rest[:3]}_mlp.2": f"{ff}.net.2"}  # fmt: skip
            return [(pre + table[rest], slice(None))]
        pre = f"single_transformer_blocks.{i}."
        if rest == "linear1":
            bounds = np.cumsum([0, H, H, H, M])
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            return [(pre + n, slice(a, b)) for n, a, b in zip(names, bounds[:-1], bounds[1:])]
        return [(pre + {"linear2": "proj_out", "modulation.lin": "norm.linear"}[rest], slice(None))]
    if module == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", "swap")]
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
    if parts[0] in emb:
        return [(f"time_text_embed.{emb[parts[0]]}.linear_{1 if parts[1] == 'in_layer' else 2}", slice(None))]
    return [
        ({"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out"}[module], slice(None))
    ]


def as_peft(terms: dict[str, tuple]) -> dict:
    """{BFL module: (down, up, scale)} -> diffusers/PEFT tensors (scale folded into lora_B), split as diffusers does."""
    out = {}
    for module, (down, up, scale) in terms.items():
        for name, rows in bfl_to_diffusers(module):
            b = np.concatenate([up[H:], up[:H]]) if rows == "swap" else up[rows]
            out[f"transformer.{name}.lora_A.weight"] = down
            out[f"transformer.{name}.lora_B.weight"] = np.ascontiguousarray(b * np.float32(scale))
    return out


class Writer:
    """Random LoRA factors for one file (rank 2 or 3, alpha where the layout has one)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def factors(self, shape, rank=None, alpha=True):
        r = rank or int(self.rng.integers(2, 4))
        down = (self.rng.standard_normal((r, shape[1])) / math.sqrt(shape[1])).astype(np.float32)
        up = (self.rng.standard_normal((shape[0], r)) * 0.3 / math.sqrt(r)).astype(np.float32)
        a = float(self.rng.choice([1.0, 2.5, 4.0])) if alpha else None
        return down, up, a


def write_kohya(tmp, seed, ref, comfy=False):
    """kohya (lora_unet_/lora_te1_, alpha) or ComfyUI's dotted diffusion_model. names. diffusers 0.42 reads the
    blocks but not single-block linear1 (its converter assumes the full model's widths) and drops the embedders'
    and final layer's LoRAs (it names them without the `transformer.` prefix it then loads): those go to
    diffusers in its own names, split as its converter splits them."""
    w, sd, split, stems = Writer(seed), {}, {}, set()
    for module, shape in bfl_linears().items():
        down, up, alpha = w.factors(shape)
        stem = f"diffusion_model.{module}" if comfy else "lora_unet_" + module.replace(".", "_")
        sd |= {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": np.array(alpha, np.float32),
        }
        if module.endswith("linear1") or not module.startswith(("double_blocks", "single_blocks")):
            split[module] = (down, up, alpha / down.shape[0])
            stems.add(stem)
    for name, shape in ref.clip_linears.items():
        down, up, alpha = w.factors(shape)
        stem = "lora_te1_" + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
        sd |= {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": np.array(alpha, np.float32),
        }
    path = tmp / f"{'comfy' if comfy else 'kohya'}.safetensors"
    save_file(sd, str(path))
    kept = {k: v for k, v in sd.items() if k.removesuffix(".alpha").removesuffix(".lora_down.weight")
            .removesuffix(".lora_up.weight") not in stems}  # fmt: skip
    save_file(kept, str(tmp / "ref_a.safetensors"))
    save_file(as_peft(split), str(tmp / "ref_b.safetensors"))
    return path, [tmp / "ref_a.safetensors", tmp / "ref_b.safetensors"]


def write_diffusers(tmp, seed, ref):
    """diffusers/PEFT names for every Linear of the diffusers transformer and CLIP, ranks 2-3, one alpha."""
    w, sd = Writer(seed), {}
    for prefix, linears in (("transformer", ref.linears), ("text_encoder", ref.clip_linears)):
        for name, shape in linears.items():
            down, up, _ = w.factors(shape)
            sd |= {f"{prefix}.{name}.lora_A.weight": down, f"{prefix}.{name}.lora_B.weight": up,
                   f"{prefix}.{name}.alpha": np.array(2.0, np.float32)}  # fmt: skip
    save_file(sd, str(tmp / "peft.safetensors"))
    return tmp / "peft.safetensors", [tmp / "peft.safetensors"]


def write_peft_metadata(tmp, seed, ref):
    """diffusers' trainers' files: no alpha keys, PEFT's LoraConfig in the header (rank/alpha patterns, rsLoRA)."""
    w, sd, names = Writer(seed), {}, list(ref.linears)
    for name in names:
        down, up, _ = w.factors(ref.linears[name], rank=2 if name == "single_transformer_blocks.1.proj_out" else 3)
        sd |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
    config = {"r": 3, "lora_alpha": 5.0, "use_rslora": True, "target_modules": names,
              "rank_pattern": {"^single_transformer_blocks.1.proj_out": 2},
              "alpha_pattern": {"transformer_blocks.0.attn.to_q": 7.0}}  # fmt: skip
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(sd, str(tmp / "meta.safetensors"), metadata=meta)
    return tmp / "meta.safetensors", [tmp / "meta.safetensors"]


def write_mixture(tmp, seed, ref):
    """lora_transformer_<diffusers name, dots as _> with alphas: diffusers' "mixture" converter maps attention
    modules only (it names the others after their block), so the file holds those."""
    w, sd = Writer(seed), {}
    for name, shape in ref.linears.items():
        if ".attn." in name:
            down, up, alpha = w.factors(shape)
            stem = "lora_transformer_" + name.replace(".", "_")
            sd |= {
                f"{stem}.lora_down.weight": down,
                f"{stem}.lora_up.weight": up,
                f"{stem}.alpha": np.array(alpha, np.float32),
            }
    save_file(sd, str(tmp / "mixture.safetensors"))
    return tmp / "mixture.safetensors", [tmp / "mixture.safetensors"]


def write_bfl(tmp, seed, ref):
    """diffusion_model.<BFL module>.lora_A/B (+ alpha): diffusers 0.42 skips these keys for FLUX.1 (it reads them
    only through its fal-Kontext / Control converters, which assume 19+38 blocks of width 3072): the reference
    is the same LoRA in diffusers' names, split as those converters split it."""
    w, sd, terms = Writer(seed), {}, {}
    for module, shape in bfl_linears().items():
        down, up, alpha = w.factors(shape)
        stem = f"diffusion_model.{module}"
        sd |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up, f"{stem}.alpha": np.array(alpha, np.float32)}
        terms[module] = (down, up, alpha / down.shape[0])
    save_file(sd, str(tmp / "bfl.safetensors"))
    save_file(as_peft(terms), str(tmp / "bfl_ref.safetensors"))
    return tmp / "bfl.safetensors", [tmp / "bfl_ref.safetensors"]


def write_xlabs(tmp, seed, ref):
    """XLabs processors: double-block qkv/proj of both streams, single-block qkv (q, k, v rows) and proj."""
    w, sd = Writer(seed), {}
    for i in range(CFG.depth):
        for kind, shape in (("qkv", (3 * H, H)), ("proj", (H, H))):
            for stream in "12":
                down, up, _ = w.factors(shape, alpha=False)
                key = f"double_blocks.{i}.processor.{kind}_lora{stream}"
                sd |= {f"{key}.down.weight": down, f"{key}.up.weight": up}
    for i in range(CFG.depth_single_blocks):
        for kind, shape in (("qkv", (3 * H, H)), ("proj", (H, H + M))):
            down, up, _ = w.factors(shape, alpha=False)
            sd |= {f"single_blocks.{i}.processor.{kind}_lora.down.weight": down,
                   f"single_blocks.{i}.processor.{kind}_lora.up.weight": up}  # fmt: skip
    save_file(sd, str(tmp / "xlabs.safetensors"))
    return tmp / "xlabs.safetensors", [tmp / "xlabs.safetensors"]


def write_export(tmp, seed, ref):
    """Our trainer's export (jaxedit.train.lora.export_peft), every target; kept: the trainer's own merge."""
    from jaxedit.train.lora import LoraConfig, export_peft
    from jaxedit.train.lora import merge as train_merge
    from tests.test_lora import random_lora

    cfg = LoraConfig(rank=3, alpha=5.0)  # scale 5/3: not a power of two
    lora = random_lora(ref.params["transformer"], cfg, seed=seed, b_scale=0.3)
    path = export_peft(lora, cfg, CFG, tmp / "export.safetensors")
    ref.expected[path] = train_merge(ref.params["transformer"], lora, cfg)
    return path, [path]


WRITERS = {"diffusers": write_diffusers, "peft-metadata": write_peft_metadata, "kohya": write_kohya,
           "kohya-comfyui": lambda t, s, r: write_kohya(t, s, r, comfy=True), "kohya-mixture": write_mixture,
           "bfl": write_bfl, "xlabs": write_xlabs, "jaxedit-export": write_export}  # fmt: skip


class Reference:
    """The tiny diffusers pipeline (transformer + CLIP, random), our converted parameters, inputs, programs."""

    def __init__(self, root):
        import diffusers
        import torch

        from checkpoints_convert import load_clip, load_transformer
        from jaxedit.models import CLIPTextModel, Flux
        from references.models import clip_text, flux_transformer, save_randomized
        from tests.test_flux_parity import make_inputs

        self.torch, self.expected = torch, {}
        transformer, clip = flux_transformer(CFG, seed=7), clip_text(PRESET.clip)
        transformer.save_pretrained(root / "transformer", safe_serialization=True)
        save_randomized(clip, root / "clip", seed=8)
        self.params = {"transformer": load_transformer(root / "transformer", CFG),
                       "clip": load_clip(root / "clip", PRESET.clip)}  # fmt: skip
        self.linears, self.clip_linears = (
            {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            for model in (transformer, clip)
        )
        self.pipe = diffusers.FluxKontextPipeline(
            scheduler=None, vae=None, text_encoder=clip, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            transformer=transformer,
        )  # fmt: skip
        self.x = make_inputs(CFG)
        self.ids = np.random.default_rng(9).integers(3, PRESET.clip.vocab_size, (2, 11)).astype(np.int32)
        self.flux, self.clip = jax.jit(Flux(CFG).apply), jax.jit(CLIPTextModel(PRESET.clip).apply)
        self.merge = jax.jit(lambda p, u, s: merge(p, u, s))  # a pipeline's per-call merge: scales traced
        self.base = self.theirs()

    def theirs(self) -> dict:
        from tests.test_flux_parity import run_reference

        with self.torch.no_grad():
            clip = self.pipe.text_encoder(self.torch.from_numpy(self.ids).long()).last_hidden_state.numpy()
        return {"transformer": run_reference(self.pipe.transformer, self.x), "clip": clip}

    def ours(self, params) -> dict:
        x, b = self.x, lambda a: jnp.broadcast_to(a, (3, *a.shape))  # noqa: E731
        out = self.flux({"params": params["transformer"]}, x["img"], b(x["img_ids"]), x["txt"], b(x["txt_ids"]),
                        x["timesteps"], x["y"], x["guidance"])  # fmt: skip
        return {"transformer": np.asarray(out), "clip": np.asarray(self.clip({"params": params["clip"]}, self.ids)[0])}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    # one intra-op thread: these models are tiny, and OpenMP threads competing with XLA's for 2 cores made each
    # forward 50x slower (0.8 s instead of 0.015 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Reference(tmp_path_factory.mktemp("lora_ref"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loras(ref, tmp_path_factory):
    """{layout: (our read of its random LoRA, the files diffusers loads for it, our file)}."""
    out = {}
    for i, (fmt, write) in enumerate(WRITERS.items()):
        path, references = write(tmp_path_factory.mktemp(fmt), 100 + i, ref)
        out[fmt] = (read_lora(path, PRESET), references, path)
    return out


def check(ref, loras, scales: dict[str, float], label: str) -> dict:
    """Ours against diffusers with the LoRAs of `scales` ({layout: scale}): diffusers loads them as adapters
    (run-time) and fuses them (merged); ours is the run-time program, one jitted `merge` of every layout's LoRA
    with the scales traced (0 for those off): the same function `add_lora` merges with at load."""
    names = []
    for fmt in scales:
        names += [f"{fmt}{j}" for j in range(len(loras[fmt][1]))]
        for f, n in zip(loras[fmt][1], names[-len(loras[fmt][1]) :]):
            ref.pipe.load_lora_weights(f, adapter_name=n, use_safetensors=True)
    ref.pipe.set_adapters(names, [scales[fmt] for fmt in scales for _ in loras[fmt][1]])
    want = ref.theirs()
    ref.pipe.fuse_lora(components=["transformer", "text_encoder"], adapter_names=names)
    want_fused = ref.theirs()
    ref.pipe.unfuse_lora(components=["transformer", "text_encoder"])
    loaded = {k: v for k, v in ref.pipe.transformer.state_dict().items() if ".lora_" in k}
    ref.pipe.delete_adapters(names)

    ours = dict(ref.params)
    vector = jnp.asarray([scales.get(fmt, 0.0) for fmt in loras], jnp.float32)
    for part in ("transformer", "clip"):
        ours[part] = ref.merge(ref.params[part], tuple(lo.updates.get(part, ()) for lo, _, _ in loras.values()), vector)
    got = ref.ours(ours)
    parts = [p for p in ("transformer", "clip") if any(p in loras[fmt][0].updates for fmt in scales)]
    errs = {p: (rel_err(got[p], want_fused[p]), rel_err(got[p], want[p]), rel_err(want[p], ref.base[p])) for p in parts}
    RESULTS[label] = "; ".join(
        f"{p}: merged {m:.1e}, run-time {r:.1e} (LoRA effect {e:.2f})" for p, (m, r, e) in errs.items()
    )
    print(f"{label}: {RESULTS[label]}")
    for p, (m, r, e) in errs.items():
        assert m <= 1e-5 and r <= 1e-5 and e > 1e-2, (label, p, m, r, e)
    return loaded


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_layout_matches_diffusers_load_lora_weights(ref, loras, fmt):
    lora, _, path = loras[fmt]
    loaded = check(ref, loras, {fmt: 0.8}, f"{fmt} ({'+'.join(lora.formats)}) at 0.8")
    if path in ref.expected:  # our export: every tensor landed in a PEFT layer, and the trainer's merge agrees
        exported = load_file(str(path))
        assert len(loaded) == len(exported) == 2 * (CFG.depth * 12 + CFG.depth_single_blocks * 5)
        for k, v in exported.items():
            assert np.array_equal(loaded[k.removeprefix("transformer.").replace(".weight", f".{fmt}0.weight")], v)
        got = flatten_dict(merge_now(ref.params["transformer"], [lora.updates["transformer"]], [1.0]))
        for k, v in flatten_dict(ref.expected[path]).items():
            assert rel_err(got[k], v) <= 1e-6, k


def test_two_loras_at_once_and_scales_never_recompile(ref, loras):
    check(ref, loras, {"kohya": 0.7, "diffusers": 0.4}, "kohya 0.7 + diffusers 0.4")
    assert ref.merge._cache_size() == 2  # one run-time program per part (transformer, CLIP), whatever the scales
    for label, line in RESULTS.items():
        print(f"  {label:<36} {line}")


# ---------------------------------------------------------------------------------------
# Our name tables against the converter's, strictness, the pipeline and the command line


def torch_linears(part: str, preset=PRESET) -> dict[str, tuple[int, int]]:
    """{module: torch weight shape} of every Linear of a part ("bfl" / "diffusers": the transformer in those names,
    "clip", "t5"), in the names the converter's tables read."""
    if part == "bfl":
        return bfl_linears(preset.transformer)
    if part == "diffusers":
        out = {}
        for module, (n_out, n_in) in bfl_linears(preset.transformer).items():
            for name, rows in bfl_to_diffusers(module):
                out[name] = (n_out if rows == "swap" else len(range(n_out)[rows]), n_in)
        return out
    if part == "clip":
        c = preset.clip
        d, i = c.hidden_size, c.intermediate_size
        names = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                 "self_attn.out_proj": (d, d), "mlp.fc1": (i, d), "mlp.fc2": (d, i)}  # fmt: skip
        return {f"encoder.layers.{n}.{k}": v for n in range(c.num_layers) for k, v in names.items()}
    t5 = preset.t5
    inner, d, f = t5.num_heads * t5.d_kv, t5.d_model, t5.d_ff
    names = {"0.SelfAttention.q": (inner, d), "0.SelfAttention.k": (inner, d), "0.SelfAttention.v": (inner, d),
             "0.SelfAttention.o": (d, inner), "1.DenseReluDense.wi_0": (f, d), "1.DenseReluDense.wi_1": (f, d),
             "1.DenseReluDense.wo": (d, f)}  # fmt: skip
    return {f"encoder.block.{n}.layer.{k}": v for n in range(t5.num_layers) for k, v in names.items()}


@pytest.mark.parametrize("naming", ["bfl", "diffusers", "clip", "t5"])
def test_module_tables_agree_with_the_converter(naming, tmp_path):
    """A rank-2 LoRA on every Linear, merged into zeros by us, equals the same weights (W = up @ down) written as a
    full checkpoint and converted by checkpoints_convert's key table: every kernel, every layout change."""
    from checkpoints_convert import flux as flux_tables
    from checkpoints_convert import text as text_tables
    from checkpoints_convert.mapping import convert, plan
    from jaxedit.lora import part_shapes
    from jaxedit.lora.targets import module_names

    part = {"bfl": "transformer", "diffusers": "transformer"}.get(naming, naming)
    rules = {"bfl": lambda: flux_tables.bfl_rules(CFG), "diffusers": lambda: flux_tables.diffusers_rules(CFG),
             "clip": lambda: text_tables.clip_rules(PRESET.clip, []),
             "t5": lambda: text_tables.t5_rules(PRESET.t5, ["shared.weight"])}[naming]()  # fmt: skip
    shapes, linears = part_shapes(PRESET)[part], torch_linears(naming)
    weights = {r.src.removesuffix(".weight") for r in rules if r.transform == "linear"}
    ours = {
        n.removeprefix("text_model.") for n in module_names(PRESET, part, "hf" if part != "transformer" else naming)
    }
    assert weights == set(linears) == ours  # every Linear of the converter's table, and no other, has a name here

    rng, sd, lora = np.random.default_rng(0), {}, {}
    prefix = {"bfl": "diffusion_model.", "diffusers": "transformer.", "clip": "text_encoder.", "t5": "text_encoder_2."}
    for module, (n_out, n_in) in linears.items():
        down, up = rng.standard_normal((2, n_in)).astype(np.float32), rng.standard_normal((n_out, 2)).astype(np.float32)
        lora |= {f"{prefix[naming]}{module}.lora_A.weight": down, f"{prefix[naming]}{module}.lora_B.weight": up}
        sd[f"{module}.weight"] = up @ down
    for r in rules:  # biases, norms, embeddings: zero
        if r.src not in sd:
            weight = sd.get(r.src.removesuffix(".bias") + ".weight")
            target = shapes[r.dst][1:] if r.layer is not None else shapes[r.dst]
            sd[r.src] = np.zeros((weight.shape[0],) if weight is not None else target, np.float32)
    save_file(lora, str(tmp_path / "all.safetensors"))
    converted = convert(plan(rules, {k: v.shape for k, v in sd.items()}, shapes), lambda k, ix: sd[k][ix])
    merged = {k: np.zeros(v, np.float32) for k, v in shapes.items() if k.endswith("/kernel")}
    for u in read_lora(tmp_path / "all.safetensors", PRESET).updates[part]:  # kernel[..., box] += a @ b
        b = u.b.reshape(*u.b.shape[: 1 + u.stacked], -1)
        index = (slice(None),) * (1 + u.stacked) + tuple(slice(lo, hi) for lo, hi in u.box)
        merged[u.param][index] += (u.a @ b).reshape(merged[u.param][index].shape)
    for k, v in merged.items():
        np.testing.assert_allclose(v, converted[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_bfl_modules_split_into_diffusers_ones_as_diffusers_converts_them():
    """The BFL -> diffusers split our export uses (`jaxedit.names.split` of the two name tables) is the one
    diffusers' converters make (`bfl_to_diffusers`): the same modules, each the same rows (norm_out.linear: the
    two halves swapped) and every column, for every Linear of the transformer."""
    from jaxedit.lora import part_shapes
    from jaxedit.names import linear_pieces, split
    from jaxedit.names.flux import bfl_rules, diffusers_rules

    shapes = part_shapes(PRESET)["transformer"]
    bfl, diffusers = linear_pieces(bfl_rules(CFG), shapes), linear_pieces(diffusers_rules(CFG), shapes)
    for module, (n_out, n_in) in bfl_linears().items():
        got = {}
        for name, rows, cols in split(bfl[module], diffusers, module):
            assert [(c, c) for c, _ in cols] == cols and sum(j - i for i, j in dict(cols)) == n_in, (module, name)
            got[name] = np.concatenate([np.arange(i, j) for _, (i, j) in sorted(rows)])
        want = {name: np.concatenate([np.arange(H, 2 * H), np.arange(H)]) if rows == "swap" else np.arange(n_out)[rows]
                for name, rows in bfl_to_diffusers(module)}  # fmt: skip
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), module


def _f(*shape):
    return np.ones(shape, np.float32)


QKV = "lora_unet_double_blocks_0_img_attn_qkv"
BAD = {  # name: (tensors, what the one-line error says besides the file's name)
    "unknown key": ({"model.foo.weight": _f(2)}, "key model.foo.weight: not a LoRA factor or alpha of a layout"),
    "up without down": ({f"{QKV}.lora_up.weight": _f(144, 2)}, f"key {QKV}.lora_up.weight: no down factor"),
    "ranks differ": ({f"{QKV}.lora_down.weight": _f(2, 48), f"{QKV}.lora_up.weight": _f(144, 3)}, "of one rank r"),
    "inputs differ": ({f"{QKV}.lora_down.weight": _f(2, 40), f"{QKV}.lora_up.weight": _f(144, 2)},
                      f"key {QKV}.lora_down.weight: factors down [2, 40], up [144, 2] do not fit"),
    "no such layer": ({"transformer.transformer_blocks.5.attn.to_q.lora_A.weight": _f(2, 48),
                       "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": _f(48, 2)},
                      "the model's transformer has no Linear 'transformer_blocks.5.attn.to_q'"),
    "no such kohya module": ({"lora_unet_double_blocks_0_img_attn_norm.lora_down.weight": _f(2, 48),
                              "lora_unet_double_blocks_0_img_attn_norm.lora_up.weight": _f(48, 2)},
                             "the transformer has no module 'double_blocks_0_img_attn_norm'"),
    "DoRA": ({f"{QKV}.dora_scale": _f(1, 48)}, "DoRA is not supported"),
    "Control LoRA": ({"double_blocks.0.img_attn.norm.query_norm.scale": _f(16)}, "FLUX Control LoRAs"),
    "some alphas": ({**{f"transformer.proj_out.lora_{x}.weight": _f(*s) for x, s in (("A", (2, 48)), ("B", (64, 2)))},
                     **{f"transformer.x_embedder.lora_{x}.weight": _f(*s) for x, s in (("A", (2, 64)), ("B", (48, 2)))},
                     "transformer.proj_out.alpha": np.array(2.0, np.float32)}, "other modules have an .alpha"),
    "T5 of SD3 (lora_te2_)": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _f(2, 8)},
                              "not a LoRA factor or alpha of a layout"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_files_are_refused_in_one_line(case, tmp_path):
    tensors, message = BAD[case]
    err, path = lora_refusal(tensors, tmp_path, PRESET)
    assert message in err and path in err and "\n" not in err, err


def test_unreadable_files_steps1x_and_scales(tmp_path):
    for name, data, message in (("lora.bin", b"\x80\x04", "pickled"), ("t.safetensors", b"\x10\x00", "not a valid")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LoraError, match=message):
            read_lora(tmp_path / name, PRESET)
    with pytest.raises(LoraError, match="not found"):
        read_lora(tmp_path / "nope.safetensors", PRESET)
    with pytest.raises(LoraError, match="Step1X-Edit"):
        read_lora(tmp_path / "t.safetensors", presets.get("step1x-edit"))
    assert parse_lora_arg("a/b.safetensors:0.7") == (Path("a/b.safetensors"), 0.7)
    assert parse_lora_arg("c:d.safetensors") == (Path("c:d.safetensors"), 1.0)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg("e.safetensors:nan")


def write_kohya_all(path: Path, preset, seed: int = 0) -> Path:
    """A kohya LoRA on the transformer's blocks, CLIP (lora_te1_) and T5 (lora_te3_)."""
    w, sd = Writer(seed), {}
    modules = {
        "lora_unet_" + m.replace(".", "_"): s for m, s in bfl_linears(preset.transformer).items() if "blocks" in m
    }
    modules |= {"lora_te1_text_model_" + m.replace(".", "_"): s for m, s in torch_linears("clip", preset).items()}
    modules |= {"lora_te3_" + m.replace(".", "_"): s for m, s in torch_linears("t5", preset).items()}
    for stem, shape in modules.items():
        down, up, alpha = w.factors(shape)
        sd |= {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": np.array(alpha, np.float32),
        }
    save_file(sd, str(path))
    return path


def test_pipeline_merges_at_load_or_per_call_and_cli(tmp_path, capsys):
    """A model folder's default LoRA kept apart: a new scale per call reuses the compiled program, and equals
    merging the LoRA at load with that scale (transformer, CLIP and T5 changed). `--lora FILE:SCALE` is read
    against the model before it loads: a bad one stops the command in one line."""
    import argparse
    import shutil

    from jaxedit import DEFAULT_MODEL
    from jaxedit.cli import main, model_identity, model_options
    from jaxedit.kontext.pipeline import KontextPipeline
    from jaxedit.lora import lora_args
    from jaxedit.model_folder import read_description, read_json, write_json

    folder = Path(shutil.copytree(DEFAULT_MODEL, tmp_path / "model"))  # the shipped model (small, trained)
    lora = write_kohya_all(folder / "style.safetensors", read_description(folder))
    default = {"loras": [{"path": lora.name, "scale": 0.7, "merge": False}]}
    write_json(folder / "jaxedit.json", read_json(folder) | {"pipeline": default})
    pipe = KontextPipeline.load(folder, dtype=jnp.float32, compile_cache=False, auto_resize=False)
    assert pipe.lora_scales == [0.7] and set(pipe.loras[0][0].updates) == {"transformer", "clip", "t5"}

    def run(**k):
        return pipe(None, ["a red square"], [0], steps=2, width=32, height=32, output="latents", **k)

    at_07, at_04 = run(), run(lora_scales=[0.4])
    pipe.add_lora(lora, 0.4, merge=True)  # now also merged into every part's weights, for good
    merged = run(lora_scales=[0.0])  # the run-time copy off: the weights merged at load alone
    assert pipe.denoise._cache_size() == 1  # scales are arguments of the one compiled loop
    same, other = rel_err(at_04, merged), rel_err(at_07, merged)
    with capsys.disabled():
        print(f"pipeline, float32 final latents: run-time at 0.4 vs merged at 0.4 {same:.1e}; at 0.7 {other:.1e}")
    assert same <= 1e-5 and other > 1e-3
    with pytest.raises(ValueError, match="2 lora_scales for 1 run-time"):
        run(lora_scales=[0.1, 0.2])

    p = argparse.ArgumentParser()
    model_options(p)
    args = p.parse_args(["--model", str(folder), "--lora", f"{lora}:0.4", "--lora", f"{lora}"])
    assert [(lo.path, s) for lo, s in lora_args(args.lora, pipe.preset)] == [(lora, 0.4), (lora, 1.0)]
    assert [lo["scale"] for lo in json.loads(model_identity(args, pipe))["loras"]] == [0.7, 0.4]  # resume key
    save_file({"lora_unet_nope.lora_down.weight": _f(2, 2)}, str(tmp_path / "bad.safetensors"))
    argv = [
        "edit",
        "--model",
        str(folder),
        "--image",
        str(tmp_path / "in.png"),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o.png"),
    ]
    (tmp_path / "in.png").write_bytes((Path(__file__).parents[1] / "examples" / "shapes.png").read_bytes())
    cases = {"nope.safetensors:2": "LoRA file not found: nope.safetensors",
             f"{tmp_path / 'bad.safetensors'}:1": "key lora_unet_nope.lora_down.weight: no up factor",
             "x.safetensors:inf": "--lora x.safetensors:inf: the scale must be a finite number"}  # fmt: skip
    for spec, message in cases.items():
        with pytest.raises(SystemExit) as e:
            main([*argv, "--lora", spec])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and "\n" not in err, err


@pytest.mark.slow
def test_full_size_kohya_and_fal_files_read_as_diffusers_converts_them(tmp_path):
    """At FLUX.1 Kontext [dev]'s sizes, where diffusers' converters work (their widths are hard-coded): a kohya
    file (every module, alpha 3 / rank 2) and a fal-Kontext `base_model.model.` file read as diffusers' own
    conversions of them to diffusers/PEFT names do, compared through each kernel's delta times a random vector.
    The final layer's kohya alpha is the one difference: diffusers drops it (scale 1), we apply alpha / r."""
    torch = pytest.importorskip("torch")
    from diffusers.loaders import lora_conversion_utils as conversion

    from jaxedit.lora import part_shapes

    preset, rng = presets.get("flux-kontext-dev"), np.random.default_rng(0)
    shapes = part_shapes(preset)["transformer"]

    def probe(lora) -> dict:
        out = {}
        for u in lora.updates["transformer"]:
            outs = shapes[u.param][1 + u.stacked :]
            v = np.random.default_rng(1).standard_normal(outs)[tuple(slice(lo, hi) for lo, hi in u.box)]
            bv = np.tensordot(u.b.astype(np.float64), v, axes=len(outs))
            out[u.param] = out.get(u.param, 0) + np.einsum("...ir,...r->...i", u.a.astype(np.float64), bv)
        return out

    def compare(ours: dict, convert) -> dict:
        save_file(ours, str(tmp_path / "ours.safetensors"))
        theirs = convert({k: torch.from_numpy(v) for k, v in ours.items()})
        save_file({k if k.startswith("transformer.") else f"transformer.{k}": v.numpy() for k, v in theirs.items()},
                  str(tmp_path / "theirs.safetensors"))  # fmt: skip
        a, b = (probe(read_lora(tmp_path / f, preset)) for f in ("ours.safetensors", "theirs.safetensors"))
        assert set(a) == set(b)
        return {k: float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in a}

    kohya, fal = {}, {}
    for module, (n_out, n_in) in bfl_linears(preset.transformer).items():
        down, up = rng.standard_normal((2, n_in)).astype(np.float32), rng.standard_normal((n_out, 2)).astype(np.float32)
        stem = "lora_unet_" + module.replace(".", "_")
        kohya |= {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": np.array(3.0, np.float32),
        }
        if module.startswith(("double_blocks", "single_blocks", "final_layer.linear")):  # what its converter reads
            fal |= {f"base_model.model.{module}.lora_A.weight": down, f"base_model.model.{module}.lora_B.weight": up}
    errs = compare(kohya, conversion._convert_kohya_flux_lora_to_diffusers)
    assert {k: round(v, 6) for k, v in errs.items() if k.startswith("final_layer")} == {
        "final_layer/linear/kernel": 0.5, "final_layer/adaLN_modulation/1/kernel": 0.5}  # fmt: skip
    assert max(v for k, v in errs.items() if not k.startswith("final_layer")) <= 1e-6
    assert max(compare(fal, conversion._convert_fal_kontext_lora_to_diffusers).values()) <= 1e-6
