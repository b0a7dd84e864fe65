"""Flow-matching objective, optimizer and train step against references written here.

The references use numpy packing/ids written as explicit loops, the model called directly,
and a numpy AdamW (clip + bias-corrected Adam + masked decoupled decay); none of
jaxedit.train's objective/optimizer code is used by them (only its random draws, whose
distributions are checked separately).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxedit import configs, presets, sampling
from jaxedit.models import Flux
from jaxedit.parallel import sharding as sh
from jaxedit.train.objective import ObjectiveConfig, draw, flow_matching_loss, loss_weight, sample_timesteps
from jaxedit.train.optim import OptimConfig, learning_rate
from jaxedit.train.step import Trainer
from tests.helpers import rel_err

CFG = presets.get("flux-kontext-tiny").transformer
B, H, W, RH, RW, LT = 4, 4, 6, 6, 4, 5  # target latent 4x6 (6 tokens), reference 6x4 (6 tokens), 5 text tokens


def ref_pack(z: np.ndarray) -> np.ndarray:
    b, h, w, c = z.shape
    out = np.zeros((b, (h // 2) * (w // 2), c * 4), z.dtype)
    for i in range(h // 2):
        for j in range(w // 2):
            for ph in range(2):
                for pw in range(2):
                    out[:, i * (w // 2) + j, np.arange(c) * 4 + ph * 2 + pw] = z[:, 2 * i + ph, 2 * j + pw, :]
    return out


def ref_ids(h2: int, w2: int, first: float) -> np.ndarray:
    return np.array([[first, i, j] for i in range(h2) for j in range(w2)], np.float32)


def random_params(seed: int = 0):
    model = Flux(CFG)
    args = (
        jnp.zeros((1, 4, CFG.in_channels)),
        jnp.zeros((1, 4, 3)),
        jnp.zeros((1, 2, CFG.context_in_dim)),
        jnp.zeros((1, 2, 3)),
        jnp.zeros((1,)),
        jnp.zeros((1, CFG.vec_in_dim)),
        jnp.zeros((1,)),
    )
    shapes = sh.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)
    # random everywhere (init zeroes the gates and the output layer), scaled by fan-in
    return jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) / math.sqrt(s.shape[-2] if len(s.shape) > 1 else 10)).astype(
            np.float32
        ),
        shapes,
    )


def make_batch(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "target": rng.standard_normal((B, H, W, 16)).astype(np.float32),
        "reference": rng.standard_normal((B, RH, RW, 16)).astype(np.float32),
        "txt": rng.standard_normal((B, LT, CFG.context_in_dim)).astype(np.float32),
        "y": rng.standard_normal((B, CFG.vec_in_dim)).astype(np.float32),
    }


def reference_inputs(batch, r, cfg: ObjectiveConfig, empty) -> tuple:
    """Model inputs, velocity target and weights of the spec, from the draws r = (t, noise, guidance, drop)."""
    t, noise, g, drop = (np.asarray(r[k]) for k in ("t", "noise", "guidance", "drop"))
    x0 = batch["target"]
    tb = t[:, None, None, None]
    x_t = ref_pack(((1 - tb) * x0 + tb * noise).astype(np.float32))
    v = ref_pack((noise - x0).astype(np.float32))
    img = np.concatenate([x_t, ref_pack(batch["reference"])], axis=1)
    ids = np.concatenate([ref_ids(H // 2, W // 2, 0.0), ref_ids(RH // 2, RW // 2, 1.0)])
    ids = np.broadcast_to(ids, (B, *ids.shape))
    txt, y = batch["txt"], batch["y"]
    if empty is not None:
        txt = np.where(drop[:, None, None], empty[0][None], txt)
        y = np.where(drop[:, None], empty[1][None], y)
    weight = {"none": np.ones_like(t), "sigma_sqrt": t**-2.0, "cosmap": 2 / (np.pi * (1 - 2 * t + 2 * t * t))}[
        cfg.weighting
    ]
    return img, ids, txt, y, t, g, v, weight.astype(np.float32)


@jax.jit
@jax.value_and_grad
def reference_loss(params, img, ids, txt, y, t, g, v, weight):
    """mean_b weight_b * mean((model(x_t)[target tokens] - v)^2): compiled once, shared by the tests."""
    txt_ids = jnp.zeros((B, LT, 3), jnp.float32)
    pred = Flux(CFG).apply({"params": params}, img, ids, txt, txt_ids, t, y, g)[:, : v.shape[1]]
    return jnp.mean(weight * jnp.mean((pred - v) ** 2, axis=(1, 2)))


def test_timestep_distributions_and_shift():
    key = jax.random.key(3)
    t = np.asarray(
        sample_timesteps(ObjectiveConfig(timestep="logit_normal", logit_mean=0.3, logit_std=0.7), key, 20000, 16)
    )
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.3) < 0.02 and abs(logit.std() - 0.7) < 0.02
    u = np.asarray(sample_timesteps(ObjectiveConfig(timestep="uniform"), key, 20000, 16))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    s = np.asarray(sample_timesteps(ObjectiveConfig(timestep="uniform", shift=3.1582), key, 20000, 16))
    np.testing.assert_allclose(s, 3.1582 * u / (1 + 2.1582 * u), rtol=1e-5)
    # resolution-dependent shift = the sampler's time_shift(flux_mu(L)) for L target tokens
    r = np.asarray(sample_timesteps(ObjectiveConfig(timestep="uniform", resolution_shift=True), key, 20000, 1024))
    np.testing.assert_allclose(r, sampling.time_shift(sampling.flux_mu(1024), u), rtol=1e-5)
    # guidance sampled in range; prompt dropout frequency
    d = draw(ObjectiveConfig(guidance=(1.0, 4.0), prompt_dropout=0.25), key, jnp.zeros((4000, 2, 2, 16)))
    g = np.asarray(d["guidance"])
    assert g.min() >= 1.0 and g.max() <= 4.0 and g.std() > 0.5
    assert abs(np.asarray(d["drop"]).mean() - 0.25) < 0.03


def test_loss_weightings():
    t = jnp.asarray([0.1, 0.5, 0.9])
    np.testing.assert_allclose(loss_weight(ObjectiveConfig(weighting="none"), t), 1.0)
    np.testing.assert_allclose(
        loss_weight(ObjectiveConfig(weighting="sigma_sqrt"), t), [100.0, 4.0, 1 / 0.81], rtol=1e-6
    )
    cos = [2 / (np.pi * (1 - 2 * x + 2 * x * x)) for x in (0.1, 0.5, 0.9)]
    np.testing.assert_allclose(loss_weight(ObjectiveConfig(weighting="cosmap"), t), cos, rtol=1e-6)


def test_loss_and_gradient_match_reference():
    """Logit-normal + shift, sigma_sqrt weighting, sampled guidance, prompt dropout."""
    cfg = ObjectiveConfig(weighting="sigma_sqrt", shift=3.1582, guidance=(1.0, 5.0), prompt_dropout=0.5)
    params, batch = random_params(), make_batch()
    rng = np.random.default_rng(5)
    empty = (
        rng.standard_normal((LT, CFG.context_in_dim)).astype(np.float32),
        rng.standard_normal(CFG.vec_in_dim).astype(np.float32),
    )
    key = jax.random.key(3)  # drops items 0 and 2 of 4 with p = 0.5
    apply = lambda p, *a: Flux(CFG).apply({"params": p}, *a)  # noqa: E731
    ours_fn = lambda p: flow_matching_loss(cfg, apply, p, batch, key, empty)[0]  # noqa: E731
    r = draw(cfg, key, jnp.asarray(batch["target"]))
    assert 0 < np.asarray(r["drop"]).sum() < B  # both branches of the dropout are exercised
    loss, grads = jax.jit(jax.value_and_grad(ours_fn))(params)
    ref_loss, ref_grads = reference_loss(params, *reference_inputs(batch, r, cfg, empty))
    assert float(loss) > 0
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    assert np.linalg.norm(flat(ref_grads)) > 0
    assert rel_err(flat(grads), flat(ref_grads)) < 1e-5


def test_changed_token_weighting_matches_reference():
    """changed_weight: target tokens whose mean |target - reference| > threshold weigh more."""
    cfg = ObjectiveConfig(changed_weight=3.0, changed_threshold=0.5)
    params, batch = random_params(), make_batch()
    rng = np.random.default_rng(7)
    target = batch["target"]
    # same-size reference: equal to the target except a few 2x2 patches (tokens) per item
    reference = target + 0.05 * rng.standard_normal(target.shape).astype(np.float32)
    for i in range(B):
        for _ in range(i + 1):
            y, x = 2 * rng.integers(H // 2), 2 * rng.integers(W // 2)
            reference[i, y : y + 2, x : x + 2] += rng.standard_normal((2, 2, 16)).astype(np.float32) * 2
    batch = batch | {"reference": reference}
    key = jax.random.key(4)
    apply = lambda p, *a: Flux(CFG).apply({"params": p}, *a)  # noqa: E731
    loss = float(flow_matching_loss(cfg, apply, params, batch, key)[0])
    plain = float(flow_matching_loss(ObjectiveConfig(), apply, params, batch, key)[0])

    r = draw(cfg, key, jnp.asarray(target))
    t, noise = np.asarray(r["t"]), np.asarray(r["noise"])
    tb = t[:, None, None, None]
    x_t, v = ref_pack((1 - tb) * target + tb * noise), ref_pack(noise - target)
    img = np.concatenate([x_t, ref_pack(reference)], axis=1)
    ids = np.concatenate([ref_ids(H // 2, W // 2, 0.0), ref_ids(H // 2, W // 2, 1.0)])
    pred = apply(params, img, np.broadcast_to(ids, (B, *ids.shape)), batch["txt"], np.zeros((B, LT, 3), np.float32),
                 t, batch["y"], np.asarray(r["guidance"]))[:, : v.shape[1]]  # fmt: skip
    e = np.mean((np.asarray(pred) - v) ** 2, axis=2)  # [B, L]
    changed = np.abs(ref_pack(target) - ref_pack(reference)).mean(axis=2) > 0.5
    assert 0 < changed.sum() < changed.size
    w = np.where(changed, 3.0, 1.0)
    expected = np.mean((w * e).sum(1) / w.sum(1))
    assert abs(loss - expected) <= 1e-5 * expected
    assert abs(plain - np.mean(e)) <= 1e-5 * plain and abs(loss - plain) > 1e-3 * plain
    with pytest.raises(ValueError, match="reference the size of the target"):
        flow_matching_loss(cfg, apply, params, make_batch(), key)
    with pytest.raises(ValueError, match="changed_weight"):
        ObjectiveConfig(changed_weight=0.0)


def test_several_references_are_packed_alone_with_their_ids_and_carry_no_loss():
    """reference (6x4 latents) and reference_1 (2x8): the model sees [x_t | each packed alone] with the community
    ids (reference 1's columns shifted by its 1 token row); the loss is on the target tokens only."""
    batch = make_batch() | {"reference_1": np.random.default_rng(2).standard_normal((B, 2, 8, 16)).astype(np.float32)}
    seen = {}

    def apply(scale, img, ids, txt, txt_ids, t, y, g):  # a stand-in model: output = scale * input
        seen.update(img=img, ids=ids)
        return scale * img + 100.0 * (jnp.arange(img.shape[1]) >= (H // 2) * (W // 2))[None, :, None]

    cfg, key = ObjectiveConfig(), jax.random.key(0)
    loss = float(flow_matching_loss(cfg, apply, 0.5, batch, key)[0])
    r = draw(cfg, key, jnp.asarray(batch["target"]))
    t, noise = np.asarray(r["t"])[:, None, None, None], np.asarray(r["noise"])
    x_t, v = ref_pack((1 - t) * batch["target"] + t * noise), ref_pack(noise - batch["target"])
    img = np.concatenate([x_t, ref_pack(batch["reference"]), ref_pack(batch["reference_1"])], axis=1)
    ids = np.concatenate([ref_ids(H // 2, W // 2, 0.0), ref_ids(RH // 2, RW // 2, 1.0), ref_ids(1, 4, 1.0) + [0, 0, 1]])
    np.testing.assert_allclose(np.asarray(seen["img"]), img, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(seen["ids"]), np.broadcast_to(ids, (B, *ids.shape)))
    assert abs(loss - np.mean((0.5 * x_t - v) ** 2)) <= 1e-5 * loss
    with pytest.raises(ValueError, match="several references take their ids from reference_ids"):
        flow_matching_loss(ObjectiveConfig(ref_index=0.0), apply, 0.5, batch, key)


def test_learning_rate_schedule():
    sched = learning_rate(OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine", final_lr_fraction=0.1), 110)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), 1e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)  # half-way through cosine
    np.testing.assert_allclose(float(sched(110)), 1e-4, rtol=1e-5)


def test_one_train_step_matches_numpy_adamw():
    """Trainer.step on a data=2 x fsdp=2 mesh (float32 compute, full remat) == reference loss/grad + numpy AdamW."""
    ocfg = ObjectiveConfig(timestep="logit_normal", shift=3.0, guidance=(1.0, 4.0))
    opt = OptimConfig(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=0.5, ema_decay=0.9)
    mesh = sh.make_mesh(configs.MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    trainer = Trainer(CFG, ocfg, opt, total_steps=10, mesh=mesh, dtype=jnp.float32, remat_policy="full")
    params, batch = random_params(), make_batch()
    state = trainer.init_state(params)
    assert state["params"]["double_blocks"]["img_attn"]["qkv"]["kernel"].sharding.spec[1] == "fsdp"
    key = jax.random.key(7)
    state, metrics = trainer.step(state, {k: v[None] for k, v in batch.items()}, key)

    r = draw(ocfg, jax.random.fold_in(jax.random.fold_in(key, 0), 0), jnp.asarray(batch["target"]))
    ref_loss, g = reference_loss(params, *reference_inputs(batch, r, ocfg, None))
    assert abs(float(metrics["loss"]) - float(ref_loss)) <= 1e-5 * float(ref_loss)
    norm = math.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    assert norm > opt.clip_norm  # clipping is active

    def adamw(path, p, gr):
        gr = np.asarray(gr, np.float64) * min(1.0, opt.clip_norm / norm)
        m, v = (1 - opt.b1) * gr, (1 - opt.b2) * gr * gr
        upd = (m / (1 - opt.b1)) / (np.sqrt(v / (1 - opt.b2)) + opt.eps)
        if path[-1].key == "kernel":  # decoupled decay on kernels only (no biases / norm scales)
            upd = upd + opt.weight_decay * p
        return p - opt.lr * upd

    expected = jax.tree_util.tree_map_with_path(adamw, params, g)
    # Step 1 of Adam moves each weight by lr * g / (|g| + eps): where |g| is within ~100
    # eps the step is ill-conditioned in g (float32 gradient rounding changes it by up to ~1%).
    # Those few weights are checked against the update's bound; all others to float32 precision.
    scale = min(1.0, opt.clip_norm / norm)
    n_ill = 0
    for path, ours in jax.tree_util.tree_leaves_with_path(state["params"]):
        exp, p0, g0 = expected, params, g
        for k in path:
            exp, p0, g0 = exp[k.key], p0[k.key], g0[k.key]
        ours, well = np.asarray(ours), np.abs(np.asarray(g0)) * scale > 1e2 * opt.eps
        n_ill += int((~well).sum())
        msg = jax.tree_util.keystr(path)
        np.testing.assert_allclose(ours[well], exp[well], rtol=2e-4, atol=2e-7, err_msg=msg)
        bound = opt.lr * (1.0 + opt.weight_decay * np.abs(np.asarray(p0))) + 1e-7
        assert np.all(np.abs(ours - np.asarray(p0))[~well] <= bound[~well]), msg
    assert n_ill < 0.05 * sum(x.size for x in jax.tree.leaves(params))
    ema = jax.tree.map(lambda p, n: 0.9 * p + 0.1 * n, params, expected)
    np.testing.assert_allclose(
        np.asarray(state["ema"]["img_in"]["kernel"]), ema["img_in"]["kernel"], rtol=2e-4, atol=2e-7
    )
    assert int(state["step"]) == 1
