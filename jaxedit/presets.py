"""The named models (presets) of every family: `presets.get("flux-kontext-dev")`; the judges (`JUDGES`).

Each family owns its presets (`jaxedit.families.Family.presets`); the config types they are made of are
`jaxedit.configs`'. No jax: the command lines list and check preset names before importing it.
"""

from __future__ import annotations

import functools

from jaxedit import configs, families


@functools.cache
def _presets() -> dict[str, configs.Preset]:
    out: dict[str, configs.Preset] = {}
    for family in families.all_families():
        for preset in family.presets:
            if preset.name in out:
                raise ValueError(f"preset {preset.name!r} is defined twice")
            out[preset.name] = preset
    return out


def get(name: str) -> configs.Preset:
    """The preset called `name`; KeyError listing the known names."""
    try:
        return _presets()[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(names())}") from None


def names() -> list[str]:
    return sorted(_presets())


# Qwen2.5-VL models that judge edits (`jaxedit eval`); planned with `jaxedit plan --preset NAME --task generate`
JUDGES = {"qwen2.5-vl-7b": configs.QWEN_VL_7B, "qwen2.5-vl-72b": configs.QWEN_VL_72B}


def qwen_vl(name: str) -> configs.QwenVLConfig:
    """The Qwen2.5-VL called `name`: a judge (`JUDGES`) or the conditioner of an editing preset (Step1X-Edit's,
    Qwen-Image-Edit's); KeyError naming the ones that have one."""
    if name in JUDGES:
        return JUDGES[name]
    q = _presets()[name].qwen if name in _presets() else None
    if q is None:
        known = [*JUDGES, *(n for n in names() if _presets()[n].qwen is not None)]
        raise KeyError(f"preset {name!r} has no Qwen2.5-VL; these have: {', '.join(known)}")
    return q
