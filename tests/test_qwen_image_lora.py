"""Qwen-Image LoRA files (jaxedit.lora) against diffusers' own loader (`QwenImageLoraLoaderMixin`).

A tiny random diffusers `QwenImageTransformer2DModel` is converted with our converter; a random LoRA on every
Linear of it (rank 3, odd alphas) is written in each layout the mixin reads (diffusers/PEFT keys with PEFT's
LoraConfig in the header; Qwen-Image-Lightning's bare lora_down / lora_up / alpha names, also behind
`diffusion_model.`; ai-toolkit's `diffusion_model.` lora_A / lora_B with alphas on some modules only; kohya's
`lora_unet_`; DiffSynth's `.lora_A.default.weight`). diffusers loads it into a minimal
`QwenImageEditPlusPipeline` (just the transformer) at scale 0.8, runs it with the adapter active, then
`fuse_lora`s it; we `read_lora` the same file and merge it into our parameters. The fused torch weights,
converted by our converter, equal our merged kernels one by one, and both forwards (run-time and fused) equal
ours, in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from jaxedit import presets
from jaxedit.configs import QwenImageConfig
from jaxedit.lora import merge_now, read_lora
from tests.helpers import lora_refusal, rel_err

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CFG = QwenImageConfig.tiny()
PRESET = dataclasses.replace(presets.get("qwen-image-edit-tiny"), transformer=CFG)
RANK = 3
RESULTS: dict[str, str] = {}  # printed by the last parity test: the figures per layout


class Writer:
    """Random rank-3 factors for one file: W += (alpha / 3) up @ down with odd alphas 5 and 7."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def factors(self, shape) -> tuple[np.ndarray, np.ndarray, float]:
        down = (self.rng.standard_normal((RANK, shape[1])) / math.sqrt(shape[1])).astype(np.float32)
        up = (self.rng.standard_normal((shape[0], RANK)) * 0.2 / math.sqrt(RANK)).astype(np.float32)
        return down, up, float(self.rng.choice([5.0, 7.0]))


def write_peft(tmp, seed, linears):
    """diffusers' trainers: transformer.<module>.lora_A / lora_B, PEFT's LoraConfig in the header (alpha 5, one
    module's 7 by alpha_pattern)."""
    w, sd = Writer(seed), {}
    for name, shape in linears.items():
        down, up, _ = w.factors(shape)
        sd |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
    config = {"r": RANK, "lora_alpha": 5.0, "target_modules": sorted(linears),
              "alpha_pattern": {"transformer_blocks.1.attn.to_k": 7.0}}  # fmt: skip
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(sd, str(tmp / "peft.safetensors"), metadata=meta)
    return tmp / "peft.safetensors"


def write_non_diffusers(tmp, seed, linears, name, *, stem, down_up, alphas="all"):
    """<stem(module)><down_up[0] / [1]> and <stem(module)>.alpha (alphas "all", "some": every other module,
    "none")."""
    w, sd = Writer(seed), {}
    for i, (module, shape) in enumerate(sorted(linears.items())):
        down, up, alpha = w.factors(shape)
        s = stem(module)
        sd |= {f"{s}{down_up[0]}": down, f"{s}{down_up[1]}": up}
        if alphas == "all" or (alphas == "some" and i % 2 == 0):
            sd[f"{s}.alpha"] = np.array(alpha, np.float32)
    save_file(sd, str(tmp / f"{name}.safetensors"))
    return tmp / f"{name}.safetensors"


DOWN_UP = (".lora_down.weight", ".lora_up.weight")
LORA_AB = (".lora_A.weight", ".lora_B.weight")
WRITERS = {
    "peft-metadata": write_peft,
    # lightx2v's Qwen-Image-Lightning 4- / 8-step files
    "lightning": functools.partial(write_non_diffusers, name="lightning", stem=str, down_up=DOWN_UP),
    "lightning-comfyui": functools.partial(write_non_diffusers, name="lightning_comfy",
                                           stem="diffusion_model.{}".format, down_up=DOWN_UP),
    "ai-toolkit": functools.partial(write_non_diffusers, name="ai_toolkit", stem="diffusion_model.{}".format,
                                    down_up=LORA_AB, alphas="some"),
    "kohya": functools.partial(write_non_diffusers, name="kohya", stem=lambda m: "lora_unet_" + m.replace(".", "_"),
                               down_up=DOWN_UP),
    "diffsynth": functools.partial(write_non_diffusers, name="diffsynth", stem=str,
                                   down_up=(".lora_A.default.weight", ".lora_B.default.weight"), alphas="none"),
}  # fmt: skip


class Reference:
    """The tiny diffusers transformer (random) in a minimal pipeline, our converted parameters, inputs, programs."""

    def __init__(self, root):
        from checkpoints_convert.qwen_image import load_qwen_image_transformer
        from jaxedit.models.qwen_image import QwenImageTransformer
        from references.qwen_image import qwen_image_transformer
        from tests.test_qwen_image import LAYOUTS, make_inputs

        self.root = root
        model = qwen_image_transformer(CFG, seed=11)
        model.save_pretrained(root / "transformer", safe_serialization=True)
        self.params = load_qwen_image_transformer(root / "transformer", CFG)
        self.linears = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.pipe = diffusers.QwenImageEditPlusPipeline(
            scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=model
        )
        self.x = make_inputs(CFG, LAYOUTS["two_refs"])
        x = self.x
        apply = functools.partial(QwenImageTransformer(CFG).apply, img_shapes=x["img_shapes"])
        args = (jnp.asarray(x["img"]), jnp.asarray(x["txt"]), jnp.asarray(x["mask"], jnp.int32), x["timesteps"])
        forward = jax.jit(lambda p: apply({"params": p}, *args))
        self.ours = lambda params: np.asarray(forward(params))
        self.base = self.theirs()

    def theirs(self) -> np.ndarray:
        from tests.test_qwen_image import run_reference

        return run_reference(self.pipe.transformer, self.x)

    def fused_params(self, name: str) -> dict:
        """The pipeline's fused transformer weights, converted by our converter."""
        from checkpoints_convert.qwen_image import load_qwen_image_transformer

        sd = {k.replace(".base_layer.", "."): v.numpy() for k, v in self.pipe.transformer.state_dict().items()
              if ".lora_" not in k}  # fmt: skip
        (self.root / name).mkdir()
        save_file(sd, str(self.root / name / "diffusion_pytorch_model.safetensors"))
        return load_qwen_image_transformer(self.root / name, CFG)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: OpenMP threads competing with XLA's for 2 cores only slow them
    yield Reference(tmp_path_factory.mktemp("qwen_lora_ref"))
    torch.set_num_threads(threads)


def test_module_names_are_the_linears_of_the_diffusers_model(ref):
    """The family's table names every Linear of diffusers' transformer, and no other module."""
    from jaxedit.lora.targets import kohya_table, module_names

    assert set(module_names(PRESET, "transformer", "diffusers")) == set(ref.linears)
    assert len(kohya_table(PRESET, "transformer", "diffusers")) == len(ref.linears)


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_layout_matches_diffusers_load_lora_weights(ref, fmt, tmp_path):
    scale = 0.8
    path = WRITERS[fmt](tmp_path, 100 + list(WRITERS).index(fmt), ref.linears)
    ref.pipe.load_lora_weights(path, adapter_name=fmt, use_safetensors=True)
    loaded = {k for k in ref.pipe.transformer.state_dict() if ".lora_" in k}
    assert len(loaded) == 2 * len(ref.linears), "diffusers left modules out"
    ref.pipe.set_adapters([fmt], [scale])
    want = ref.theirs()
    ref.pipe.fuse_lora(components=["transformer"], adapter_names=[fmt])
    want_fused = ref.theirs()
    fused = flatten_dict(ref.fused_params(fmt), sep="/")
    ref.pipe.unfuse_lora(components=["transformer"])
    ref.pipe.delete_adapters([fmt])

    lora = read_lora(path, PRESET)
    assert list(lora.updates) == ["transformer"]
    merged = merge_now(ref.params, [lora.updates["transformer"]], [scale])
    flat, base = flatten_dict(merged, sep="/"), flatten_dict(ref.params, sep="/")
    assert flat.keys() == fused.keys()
    kernels = [k for k in flat if k.endswith("/kernel")]
    assert len(kernels) == 4 + 2 + 14  # embedders, output, per-block linears (stacked): every Linear
    worst = 0.0
    for k in flat:
        err = rel_err(flat[k], fused[k])
        worst = max(worst, err) if k in kernels else worst
        assert err <= 1e-5, (fmt, k, err)
        if k in kernels:
            assert rel_err(flat[k], base[k]) > 1e-3, (fmt, k)  # the LoRA changed it
        else:
            assert np.array_equal(flat[k], base[k]), (fmt, k)
    got = ref.ours(merged)
    m, r, e = rel_err(got, want_fused), rel_err(got, want), rel_err(want, ref.base)
    RESULTS[fmt] = f"kernels max {worst:.1e}; forward merged {m:.1e}, run-time {r:.1e} (LoRA effect {e:.2f})"
    print(f"{fmt} ({'+'.join(lora.formats)}) at {scale}: {RESULTS[fmt]}")
    assert m <= 1e-5 and r <= 1e-5 and e > 1e-2, (fmt, m, r, e)


def test_two_layouts_at_once(ref, tmp_path):
    """Lightning at 0.7 with a kohya LoRA at 0.4: diffusers' two adapters, fused, and our one merge agree."""
    paths = {fmt: WRITERS[fmt](tmp_path, 200 + i, ref.linears) for i, fmt in enumerate(("lightning", "kohya"))}
    for fmt, path in paths.items():
        ref.pipe.load_lora_weights(path, adapter_name=f"two-{fmt}", use_safetensors=True)
    names = [f"two-{fmt}" for fmt in paths]
    ref.pipe.set_adapters(names, [0.7, 0.4])
    ref.pipe.fuse_lora(components=["transformer"], adapter_names=names)
    want = ref.theirs()
    ref.pipe.unfuse_lora(components=["transformer"])
    ref.pipe.delete_adapters(names)
    loras = [read_lora(p, PRESET).updates["transformer"] for p in paths.values()]
    err = rel_err(ref.ours(merge_now(ref.params, loras, [0.7, 0.4])), want)
    print(f"lightning 0.7 + kohya 0.4: forward {err:.1e}")
    for label, line in RESULTS.items():
        print(f"  {label:<18} {line}")
    assert err <= 1e-5


def _f(*shape):
    return np.ones(shape, np.float32)


Q = "transformer_blocks.0.attn.to_q"
D = CFG.num_attention_heads * CFG.attention_head_dim
BAD = {  # name: (tensors, what the one-line error says besides the file's name)
    "FLUX kohya names": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": _f(2, D),
                          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": _f(3 * D, 2)},
                         "the transformer has no module 'double_blocks_0_img_attn_qkv' (kohya name)"),
    "FLUX BFL names": ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": _f(2, D),
                        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": _f(3 * D, 2)},
                       "the model's transformer has no Linear 'double_blocks.0.img_attn.qkv'"),
    "a text encoder": ({"text_encoder.model.layers.0.mlp.fc1.lora_A.weight": _f(2, 8)},
                       "not a LoRA factor or alpha of a layout jaxedit reads (diffusers/PEFT, bare diffusers names"),
    "no such layer": ({"transformer_blocks.2.attn.to_q.lora_down.weight": _f(2, D),
                       "transformer_blocks.2.attn.to_q.lora_up.weight": _f(D, 2)},
                      "the model's transformer has no Linear 'transformer_blocks.2.attn.to_q'"),
    "inputs differ": ({f"{Q}.lora_down.weight": _f(2, D + 1), f"{Q}.lora_up.weight": _f(D, 2)},
                      f"key {Q}.lora_down.weight: factors down [2, {D + 1}], up [{D}, 2] do not fit"),
    "up without down": ({f"{Q}.lora_up.weight": _f(D, 2), f"{Q}.alpha": np.array(2.0, np.float32)},
                        "no down factor"),
    "DoRA": ({f"{Q}.dora_scale": _f(1, D)}, "DoRA is not supported"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_files_are_refused_in_one_line(case, tmp_path):
    tensors, message = BAD[case]
    err, path = lora_refusal(tensors, tmp_path, PRESET)
    assert message in err and path in err and "\n" not in err, err
