"""Load a model folder as the editing pipeline of its family (from its `jaxedit.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxedit import model_folder


def load_pipeline(folder: str | Path, **kw: Any):
    """`KontextPipeline.load` (families flux-kontext, flux) or `Step1XEditPipeline.load` (step1x-edit);
    kw go to that `load`."""
    family = model_folder.read_description(folder).family
    if family == "step1x-edit":
        from jaxedit.step1x.pipeline import Step1XEditPipeline

        return Step1XEditPipeline.load(folder, **kw)
    from jaxedit.kontext.pipeline import KontextPipeline

    return KontextPipeline.load(folder, **kw)
