"""The Qwen-Image(-Edit 2509 / 2511) DiT's files: diffusers `QwenImageTransformer2DModel` folders -> jaxedit
`QwenImageTransformer` params, checked and streamed; the family's converter (a diffusers release).

The DiT's key table itself is the library's (`jaxedit.names.qwen_image.diffusers_rules`), which the LoRA
loader derives from as well.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints_convert.family import FamilyConverter, Part
from checkpoints_convert.mapping import ConversionError, Plan, convert, flatten, plan, unflatten
from checkpoints_convert.published import Published
from checkpoints_convert.source import SafetensorsSource
from jaxedit.configs import QwenImageConfig, QwenImageVAEConfig
from jaxedit.models.qwen_image import abstract_params
from jaxedit.names.qwen_image import ATTN_LINEARS, ATTN_NORMS, diffusers_rules

__all__ = ["ATTN_LINEARS", "ATTN_NORMS", "CONVERTER", "FORMATS", "diffusers_rules", "load_qwen_image_transformer",
           "plan_transformer", "target_shapes"]  # fmt: skip

FORMATS = ("diffusers",)


def target_shapes(cfg: QwenImageConfig) -> dict[str, tuple[int, ...]]:
    """{"a/b": shape} of `QwenImageTransformer(cfg)`'s parameters."""
    return {k: tuple(v.shape) for k, v in flatten(abstract_params(cfg)).items()}


def plan_transformer(source, cfg: QwenImageConfig, *, ignore: Callable[[str], bool] | None = None) -> Plan:
    """Check a source (a `SafetensorsSource`, or anything with `.shapes` and `.describe()`) against `cfg` on
    names and shapes alone: ConversionError naming any unknown, missing or mis-shaped tensor."""
    the_plan = plan(
        diffusers_rules(cfg), source.shapes, target_shapes(cfg), source_name=source.describe(), ignore=ignore
    )
    the_plan.fmt = "diffusers"
    return the_plan


def load_qwen_image_transformer(
    path: str | Path,
    cfg: QwenImageConfig,
    *,
    dtype: Any = None,
    place: Callable[[str, np.ndarray], Any] | None = None,
    ignore: Callable[[str], bool] | None = None,
) -> dict:
    """A diffusers Qwen-Image `transformer/` folder (one file or shards with their index) -> the parameter
    pytree of `QwenImageTransformer(cfg)`, each tensor converted as it is read (no torch).

    dtype: output dtype (default: keep the file's); place(path, host_array): where each finished parameter
    goes (default: jax.device_put); ignore(key): source tensors to skip on purpose. As
    `checkpoints_convert.load_part`: names, shapes and dtypes are all checked before anything is converted.
    """
    source = SafetensorsSource(path)
    the_plan = plan_transformer(source, cfg, ignore=ignore)
    for key in {r.src for r in the_plan.rules}:
        source.dtype(key)  # ConversionError naming the file for an unsupported dtype
    place = place or (lambda _, a: jax.device_put(a))
    return unflatten(convert(the_plan, source.read, dtype=dtype, source_dtype=source.dtype, place=place))


# ---------------------------------------------------------------------------------------
# The family's converter: a diffusers release (model_index.json; transformer/ in shards with their index, vae/,
# text_encoder/ (Qwen2.5-VL-7B), tokenizer/, processor/, scheduler/)

EDIT_PRESETS = ("qwen-image-edit-2509", "qwen-image-edit-2511")
QWEN_PROCESSOR_DIRS = ("tokenizer", "processor")  # their files make qwen_processor/ (the processor's win)


def _transformer_rules(source, cfg: QwenImageConfig, fmt: str | None):
    if fmt not in (None, *FORMATS):
        raise ConversionError(f"a Qwen-Image transformer is read in layout 'diffusers', not {fmt!r}")
    return diffusers_rules(cfg), "diffusers"


def _vae_rules(source, cfg, fmt: str | None):
    from checkpoints_convert import qwen_image_vae as vae

    if fmt not in (None, vae.FORMAT):
        raise ConversionError(f"a Qwen-Image VAE is read in layout {vae.FORMAT!r}, not {fmt!r}")
    return vae.diffusers_rules(cfg), vae.FORMAT


def _vae_targets(cfg):
    from checkpoints_convert import qwen_image_vae as vae

    return vae.target_shapes(cfg)


class QwenImageConverter(FamilyConverter):
    """The transformer and VAE from the release's folders, its Qwen2.5-VL (text_encoder/) as qwen/ with the
    tokenizer and processor files as qwen_processor/, and its scheduler's settings as the folder's pipeline option
    "scheduler"."""

    parts = {
        "transformer": Part(QwenImageConfig, _transformer_rules, target_shapes, FORMATS),
        "vae": Part(QwenImageVAEConfig, _vae_rules, _vae_targets, ("diffusers",)),
    }
    diffusers_dirs = {"transformer": "transformer", "vae": "vae", "qwen": "text_encoder"}
    published = (
        Published("diffusers-qwen-image-edit-transformer", "transformer", "diffusers", EDIT_PRESETS),
        Published("diffusers-qwen-image-vae", "vae", "diffusers", EDIT_PRESETS),
        Published("hf-qwen2.5-vl-7b", "qwen", "transformers", EDIT_PRESETS),
    )

    def release_config(self, preset, part: str, paths: dict):
        """The Qwen2.5-VL's from its config.json (its width checked against the DiT's text width)."""
        if part != "qwen":
            return super().release_config(preset, part, paths)
        return qwen_config(paths["qwen"], preset)

    def release_folders(self, preset) -> dict[str, str]:
        return {d: d for d in (*QWEN_PROCESSOR_DIRS, "scheduler")}

    def write_extra(self, new: Path, preset, inputs: dict, paths: dict) -> dict:
        """qwen_processor/ (the tokenizer's and the processor's files, the text encoder's config.json), the "qwen"
        entry, the scheduler's settings."""
        import json
        import shutil

        from jaxedit.checkpoint import seal
        from jaxedit.qwen_image.sampling import SchedulerConfig
        from jaxedit.qwen_image.text import QWEN_PROCESSOR, qwen_entry

        out = new / QWEN_PROCESSOR
        out.mkdir()
        for d in QWEN_PROCESSOR_DIRS:
            for f in sorted(paths[d].iterdir()):
                if f.is_file():
                    shutil.copy2(f, out / f.name)
        shutil.copy2(paths["qwen"] / "config.json", out / "config.json")
        seal(out)
        extra = qwen_entry(None, None, qwen_config(paths["qwen"], preset))
        sched = paths["scheduler"] / "scheduler_config.json"
        if sched.is_file():
            try:
                config = SchedulerConfig.from_dict(json.loads(sched.read_text()))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise ConversionError(f"{sched}: {e}") from None
            extra["pipeline"] = {"scheduler": config.to_dict()}
        return extra


CONVERTER = QwenImageConverter()


def qwen_config(folder: Path, preset):
    """The `QwenVLConfig` of the release's Qwen2.5-VL (its config.json), its width the DiT's text width."""
    from checkpoints_convert.qwen import read_config

    return read_config(folder, preset.transformer.joint_attention_dim, "the transformer's text width")
