"""Test helpers shared by the parity tests (the torch reference models are `references`)."""

from __future__ import annotations

import numpy as np


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| in float64 (stricter than `rel_err`'s norm ratio: one bad row cannot hide)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def lora_refusal(tensors: dict, tmp_path, preset) -> tuple[str, str]:
    """(the LoraError message, the file) of `read_lora` on a LoRA file of `tensors` written in `tmp_path`."""
    import pytest
    from safetensors.numpy import save_file

    from jaxedit.lora import LoraError, read_lora

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LoraError) as e:
        read_lora(path, preset)
    return str(e.value), str(path)
