"""Load a model folder as the editing pipeline of its family (from its `jaxedit.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxedit.model_folder import ModelFolder


def load_pipeline(folder: str | Path | ModelFolder, **kw: Any):
    """`KontextPipeline.load` (families flux-kontext, flux) or `Step1XEditPipeline.load` (step1x-edit) of a
    model folder (a path, opened here, or an opened `ModelFolder`, handed on as it is); kw go to that `load`."""
    folder = ModelFolder.of(folder)
    if folder.family == "step1x-edit":
        from jaxedit.step1x.pipeline import Step1XEditPipeline

        return Step1XEditPipeline.load(folder, **kw)
    from jaxedit.kontext.pipeline import KontextPipeline

    return KontextPipeline.load(folder, **kw)
