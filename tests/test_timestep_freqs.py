"""The timestep embedding's frequencies are torch's float32 values (#35 item 13): both references (BFL's
`timestep_embedding`, diffusers' `get_timestep_embedding`) take torch's float32 exp, which is not always the
correctly rounded one, and with arguments up to 4,000 rad one ulp of a frequency moves the DiT by ~1e-5."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxedit.models.layers import sinusoid_freqs, timestep_embedding

WIDTHS = (256,)  # every timestep embedding of the models: FLUX's time_in / guidance_in, Step1X's connector


@pytest.mark.parametrize("dim", WIDTHS)
def test_frequencies_are_torchs_float32_values(dim):
    torch = pytest.importorskip("torch")
    half = dim // 2
    bfl = torch.exp(-math.log(10000.0) * torch.arange(start=0, end=half, dtype=torch.float32) / half).numpy()
    exponent = -math.log(10000.0) * torch.arange(start=0, end=half, dtype=torch.float32)  # diffusers' spelling
    diffusers = torch.exp(exponent / (half - 0)).numpy()
    ours = sinusoid_freqs(half, 10000.0)
    np.testing.assert_array_equal(ours.view(np.uint32), bfl.view(np.uint32))
    np.testing.assert_array_equal(ours.view(np.uint32), diffusers.view(np.uint32))
    # and the embedding built from them: diffusers' Timesteps(256, flip_sin_to_cos=True, shift 0) of 1000 t
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([1.0, 0.731, 0.25, 0.003], np.float32)
    want = get_timestep_embedding(torch.from_numpy(t) * 1000, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    got = np.asarray(timestep_embedding(t, dim))
    np.testing.assert_allclose(got, want.numpy(), atol=2e-6, rtol=0)
