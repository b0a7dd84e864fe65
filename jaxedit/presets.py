"""The named models (presets) of every family: `presets.get("flux-kontext-dev")`.

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
