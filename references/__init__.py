"""PyTorch reference models for the parity tests and benchmarks (test time only; the library never
imports this package or torch).

Built from the installed diffusers / transformers at our presets' sizes, with EVERY parameter
re-drawn at random (`randomize_`: no zero or identity initialisation left to hide a branch), and
saved as safetensors the way the published checkpoints are, so our converter reads them.
"""
