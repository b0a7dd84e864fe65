"""Scoring edits: the benchmark runs behind `jaxedit eval` and the usual metrics (L1, CLIP image and text
similarity: `jaxedit.evaluation.metrics`)."""
