"""FLUX.1 Kontext (and FLUX.1 text-to-image): the editing pipeline and its T5 + CLIP text conditioning."""
