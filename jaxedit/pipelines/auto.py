"""Load a model folder as the editing pipeline of its family (from its `jaxedit.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxedit import families
from jaxedit.model_folder import ModelFolder


def load_pipeline(folder: str | Path | ModelFolder, **kw: Any):
    """The `load` of the folder's family's pipeline (`jaxedit.families`: `KontextPipeline` for flux-kontext and
    flux, `Step1XEditPipeline` for step1x-edit) of a model folder (a path, opened here, or an opened
    `ModelFolder`, handed on as it is); kw go to that `load`."""
    folder = ModelFolder.of(folder)
    return families.of(folder).pipeline().load(folder, **kw)
