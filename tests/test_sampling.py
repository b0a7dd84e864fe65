"""Sampling helpers against diffusers' FLUX Kontext pipeline and scheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import sampling
from jaxedit.kontext.sizes import PREFERRED_KONTEXT_RESOLUTIONS, preferred_kontext_size

torch = pytest.importorskip("torch")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux import pipeline_flux_kontext as dk  # noqa: E402


def test_pack_matches_diffusers_and_inverts():
    rng = np.random.default_rng(0)
    z_nchw = rng.standard_normal((3, 16, 6, 10)).astype(np.float32)
    ref = dk.FluxKontextPipeline._pack_latents(torch.from_numpy(z_nchw), 3, 16, 6, 10).numpy()
    ours = sampling.pack(jnp.asarray(z_nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(ours), ref)
    back = sampling.unpack(ours, 6, 10)
    np.testing.assert_array_equal(np.asarray(back), z_nchw.transpose(0, 2, 3, 1))
    # diffusers' unpack takes pixel sizes (latent x 8)
    ref_back = dk.FluxKontextPipeline._unpack_latents(torch.from_numpy(ref), 48, 80, 8).numpy()
    np.testing.assert_array_equal(ref_back.transpose(0, 2, 3, 1), np.asarray(back))


def test_ids_match_diffusers():
    ref = dk.FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(sampling.image_ids(3, 5), ref)
    ref[:, 0] = 1
    np.testing.assert_array_equal(sampling.image_ids(3, 5, 1.0), ref)


def test_reference_ids_conventions():
    """One reference: (1, row, col) in every convention. Several (3x2, 2x2, 3x3 token grids): community (and
    community-own-sizes: the same ids, other sizes) shifts reference i's columns by i x its rows; offset tiles a
    canvas (no two tokens share an id); index counts."""
    from jaxedit.cli import REFERENCE_IDS

    assert REFERENCE_IDS == sampling.REFERENCE_IDS  # the CLI's copy (it imports no jax)
    for c in sampling.REFERENCE_IDS:
        np.testing.assert_array_equal(sampling.reference_ids([(3, 5)], c), sampling.image_ids(3, 5, 1.0))
    grids = [(3, 2), (2, 2), (3, 3)]
    parts = lambda c: np.split(sampling.reference_ids(grids, c), [6, 10])  # noqa: E731
    community, own_sizes, offset, index = (parts(c) for c in sampling.REFERENCE_IDS)
    for i, (h2, w2) in enumerate(grids):
        np.testing.assert_array_equal(community[i], sampling.image_ids(h2, w2, 1.0, col=i * h2))
        np.testing.assert_array_equal(own_sizes[i], community[i])
        np.testing.assert_array_equal(index[i], sampling.image_ids(h2, w2, i + 1.0))
    corners = [tuple(int(v) for v in x[0, 1:]) for x in offset]
    assert corners == [(0, 0), (0, 2), (3, 0)]  # right of the first (taller than wide), then below both
    assert len({tuple(r) for r in np.concatenate(offset)}) == 6 + 4 + 9


@pytest.mark.parametrize("steps,seq_len", [(4, 15), (28, 4096), (30, 1024)])
def test_schedule_matches_diffusers(steps, seq_len):
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=dk.calculate_shift(seq_len))
    ours = sampling.flux_schedule(steps, seq_len)
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=0, atol=2e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 1000), (1920, 1080), (300, 1200), (517, 389)])
def test_preferred_kontext_size_matches_diffusers(size):
    w, h = size
    aspect = w / h
    _, rw, rh = min((abs(aspect - pw / ph), pw, ph) for pw, ph in dk.PREFERRED_KONTEXT_RESOLUTIONS)
    assert preferred_kontext_size(w, h) == (rw // 16 * 16, rh // 16 * 16)
    assert PREFERRED_KONTEXT_RESOLUTIONS == tuple(dk.PREFERRED_KONTEXT_RESOLUTIONS)


def test_noise_depends_only_on_seed():
    batch = sampling.noise_for_seeds(jnp.array([5, 7, 9]), (4, 6, 16))
    alone = sampling.noise_for_seeds(jnp.array([7]), (4, 6, 16))
    np.testing.assert_array_equal(np.asarray(batch[1]), np.asarray(alone[0]))
    assert not np.allclose(np.asarray(batch[0]), np.asarray(batch[1]))


def test_euler_with_oracle_velocity_lands_on_x0():
    """With v = (x - x0) / t (the true velocity of the straight path x_t = (1-t) x0 + t noise),
    Euler stays on the path and reaches x0 at t = 0: checks the sign and the update."""
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    ts = sampling.flux_schedule(6, 100)
    out = jax.jit(lambda x: sampling.euler_sample(lambda x, t: (x - x0) / t[:, None, None], x, ts))(noise)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)
