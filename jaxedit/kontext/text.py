"""FLUX text conditioning: prompts -> (T5 tokens `txt`, pooled CLIP vector `y`).

Mirrors diffusers' `FluxPipeline._get_t5_prompt_embeds` / `_get_clip_prompt_embeds`
(FluxKontextPipeline uses the same code): each tokenizer pads to `max_length` and
truncates (T5: `max_sequence_length`, 512 by default; CLIP: 77), no attention mask is
passed to either encoder; `txt` is T5's last hidden state, `y` is CLIP's pooled output.

Tokenizers are read from local folders only (FLUX repo layout: `tokenizer/` is CLIP's,
`tokenizer_2/` is T5's), never from the hub.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxedit.configs import CLIPTextConfig, T5Config
from jaxedit.lora.apply import merge
from jaxedit.models.clip import CLIPTextModel
from jaxedit.models.t5 import T5Encoder
from jaxedit.options import MAX_PROMPT_CHARS

log = logging.getLogger(__name__)

# Tokenizer classes named in tokenizer_config.json that are imported directly
# (AutoTokenizer would pull in torch); anything else goes through AutoTokenizer.
_DIRECT_CLASSES = {
    "CLIPTokenizer": "CLIPTokenizer",
    "CLIPTokenizerFast": "CLIPTokenizer",
    "T5Tokenizer": "T5Tokenizer",
    "T5TokenizerFast": "T5Tokenizer",
}


def load_tokenizer(path: str | Path):
    """A transformers tokenizer from a local folder (`tokenizer_config.json` + files)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path} (tokenizers are only read from local folders)")
    # jaxedit uses transformers' tokenizers only: its notice that PyTorch is absent is noise here
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    config = path / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    tokenizer_cls = getattr(transformers, _DIRECT_CLASSES.get(name, "AutoTokenizer"))
    return tokenizer_cls.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, what: str = "text") -> np.ndarray:
    """input_ids [B, max_length] (int32): padded to max_length, truncated, as diffusers does. A prompt is cut to
    MAX_PROMPT_CHARS characters first (far more than max_length tokens): a tokenizer given megabytes of text
    takes gigabytes (and the whole text is tokenized once more, to warn about the truncation)."""
    long = [i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
    if long:
        log.warning("%s prompt(s) %s cut to %d characters before tokenizing", what, long, MAX_PROMPT_CHARS)
        prompts = [p[:MAX_PROMPT_CHARS] for p in prompts]
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")[
        "input_ids"
    ]
    full = tokenizer(list(prompts), truncation=False)["input_ids"]
    cut = [i for i, f in enumerate(full) if len(f) > max_length]
    if cut:
        log.warning("%s prompt(s) %s truncated to %d tokens", what, cut, max_length)
    return np.asarray(ids, np.int32)


class FluxTextEncoder:
    """T5 + CLIP with their tokenizers; `encode(prompts)` -> (txt [B, L, d_model], y [B, D_clip]).

    t5_params / clip_params: the parameter pytrees of `T5Encoder(t5_cfg)` and
    `CLIPTextModel(clip_cfg)` (e.g. from `checkpoints_convert.load_t5` / `load_clip`).
    dtype: compute dtype of both encoders (outputs have it).
    Run-time LoRAs (`jaxedit.lora`): `encode(..., loras={"t5": (updates of each LoRA, scales), "clip": ...})`
    merges them into a copy of the weights inside the jitted encoder (new scales reuse the program).
    """

    def __init__(
        self,
        t5_cfg: T5Config,
        clip_cfg: CLIPTextConfig,
        t5_params: Any,
        clip_params: Any,
        t5_tokenizer: Any,
        clip_tokenizer: Any,
        *,
        dtype: Any = jnp.float32,
        scan_layers: bool = True,
    ):
        self.t5_cfg, self.clip_cfg = t5_cfg, clip_cfg
        self.t5_params, self.clip_params = t5_params, clip_params
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.t5 = T5Encoder(t5_cfg, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
        self.clip = CLIPTextModel(clip_cfg, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
        self.mesh = None  # `place`: the pipeline's mesh
        self._t5_fn = jax.jit(lambda p, ids, lora=None: self.t5.apply({"params": _with(p, lora)}, ids))
        self._clip_fn = jax.jit(lambda p, ids, lora=None: self.clip.apply({"params": _with(p, lora)}, ids)[1])

    @property
    def on_host(self) -> bool:
        """Whether the weights are in host memory (the CPU device: `text_on_cpu`)."""
        leaf = jax.tree.leaves(self.t5_params)[0]
        return (
            isinstance(leaf, jax.Array)
            and {d.platform for d in leaf.devices()} == {"cpu"}
            and any(d.platform != "cpu" for d in jax.devices())
        )

    def place(self, mesh, shardings) -> None:
        """Run on `mesh`: T5 and CLIP weights placed by `shardings(part, params)` (the pipeline's), token ids
        split over the mesh's batch axes."""
        self.mesh = mesh
        self.t5_params = jax.device_put(self.t5_params, shardings("t5", self.t5_params))
        self.clip_params = jax.device_put(self.clip_params, shardings("clip", self.clip_params))

    def tokenize(
        self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None, max_sequence_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(t5_ids [B, max_sequence_length], clip_ids [B, clip max_length]); T5 reads prompts_2 if given."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts_2 = prompts if prompts_2 is None else ([prompts_2] if isinstance(prompts_2, str) else list(prompts_2))
        if len(prompts_2) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompts_2)} prompts_2")
        t5_len = max_sequence_length or self.t5_cfg.max_length
        if t5_len > 512:
            raise ValueError(f"max_sequence_length {t5_len} is above FLUX's 512")
        clip_len = self.clip_cfg.max_length
        return (
            tokenize(self.t5_tokenizer, prompts_2, t5_len, "T5"),
            tokenize(self.clip_tokenizer, prompts, clip_len, "CLIP"),
        )

    def encode_ids(
        self, t5_ids_BL: np.ndarray, clip_ids_BL: np.ndarray, loras: dict | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(txt [B, L, d_model], y [B, D_clip]) from token ids (no attention masks, as FLUX); loras: run-time
        LoRAs of "t5" / "clip", each (per LoRA its tuple of `Update`s, scales [n])."""
        loras = loras or {}
        if self.mesh is None:
            txt = self._t5_fn(self.t5_params, jnp.asarray(t5_ids_BL, jnp.int32), loras.get("t5"))
            y = self._clip_fn(self.clip_params, jnp.asarray(clip_ids_BL, jnp.int32), loras.get("clip"))
            return txt, y
        from jaxedit.parallel import placement
        from jaxedit.parallel import sharding as sh

        b = len(t5_ids_BL)
        n = placement.padded(b, self.mesh)
        put = lambda a: jax.device_put(placement.pad(np.asarray(a, np.int32), n), sh.batch_sharding(self.mesh, 2))  # noqa: E731
        with sh.activate(self.mesh):
            txt = self._t5_fn(self.t5_params, put(t5_ids_BL), loras.get("t5"))
            y = self._clip_fn(self.clip_params, put(clip_ids_BL), loras.get("clip"))
        return txt[:b], y[:b]

    def encode(
        self,
        prompts: Sequence[str],
        prompts_2: Sequence[str] | None = None,
        max_sequence_length: int | None = None,
        loras: dict | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (txt [B, max_sequence_length, d_model], y [B, D_clip]), as diffusers' FluxPipeline."""
        return self.encode_ids(*self.tokenize(prompts, prompts_2, max_sequence_length), loras)

    __call__ = encode


def _with(params, lora):
    """params with run-time LoRAs (updates of each, scales) merged in (None: params)."""
    return params if lora is None else merge(params, *lora)
