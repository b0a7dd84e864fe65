"""Inference entry points: `python -m infer` (batch manifest) and `python -m infer edit` (one image)."""
