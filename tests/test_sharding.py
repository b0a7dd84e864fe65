"""Sharded execution equals unsharded execution (8 fake CPU devices, see conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxedit.models.flux import abstract_params
from jaxedit.parallel import sharding as sh
from jaxedit.presets import get
from tests.helpers import rel_err
from tests.sharded_model import flat, model_and_data, train_step

MESHES = {"dp8": "data=8", "fsdp8": "fsdp=8", "fsdp4_tp2": "fsdp=4,tensor=2"}
# data=8 replicates the parameters and splits the batch, as fsdp=8 splits it: its runs are -m slow only
MESH_PARAMS = [pytest.param("dp8", marks=pytest.mark.slow), "fsdp8", "fsdp4_tp2"]
GOLDEN = Path(__file__).parent / "golden" / "flux_kontext_dev_partition_specs.json"


def test_eight_fake_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py must set --xla_force_host_platform_device_count=8"


@pytest.fixture(scope="module")
def setup():
    model, boxed, params, args, target, opt = model_and_data()
    ref_out = jax.jit(model.apply)({"params": params}, *args)
    ref = jax.jit(train_step(model, opt))(params, opt.init(params), args, target)
    return model, boxed, params, args, target, opt, ref_out, ref


@pytest.mark.parametrize("mesh_name", MESH_PARAMS)
def test_forward_and_train_step_match_unsharded(setup, mesh_name):
    model, boxed, params, args, target, opt, ref_out, (ref_params, _, ref_loss, ref_grads) = setup
    step = train_step(model, opt)

    mesh = sh.make_mesh(sh.MeshConfig.parse(MESHES[mesh_name]))
    p_shard = sh.shardings(boxed, mesh)
    params_s = jax.device_put(params, p_shard)
    args_s = [jax.device_put(a, sh.batch_sharding(mesh, a.ndim)) for a in args]
    target_s = jax.device_put(target, sh.batch_sharding(mesh, 3))
    opt_state_s = jax.jit(opt.init, out_shardings=None)(params_s)
    with sh.activate(mesh):
        out = jax.jit(model.apply)({"params": params_s}, *args_s)
        new_params, _, loss, grads = jax.jit(step)(params_s, opt_state_s, args_s, target_s)

    assert out.sharding.is_equivalent_to(sh.batch_sharding(mesh, 3), 3)
    leaf = new_params["double_blocks"]["img_attn"]["qkv"]["kernel"]
    assert leaf.sharding.is_equivalent_to(p_shard["double_blocks"]["img_attn"]["qkv"]["kernel"], leaf.ndim)
    assert rel_err(out, ref_out) <= 1e-6
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    assert rel_err(flat(grads), flat(ref_grads)) <= 1e-6
    assert rel_err(flat(new_params), flat(ref_params)) <= 1e-6


def full_size_specs(mesh_spec: str) -> dict[str, str]:
    """Effective PartitionSpec of every full-size flux-kontext-dev parameter on a mesh."""
    from checkpoints_convert.mapping import flatten

    cfg = get("flux-kontext-dev").transformer
    shape = dict(sh.MeshConfig.parse(mesh_spec).__dict__)
    devices = np.empty((shape["data"], shape["fsdp"], shape["tensor"]), object)
    mesh = jax.sharding.AbstractMesh(devices.shape, sh.MESH_AXES)
    specs = flatten(sh.mesh_specs(abstract_params(cfg, boxed=True)))
    return {k: str(sh.effective_spec(v, mesh)) for k, v in specs.items()}


def test_full_size_partition_specs_golden():
    """The full-size parameter layout on two meshes; regenerate with
    `python -m tests.test_sharding` after an intended change and review the diff."""
    golden = json.loads(GOLDEN.read_text())
    for mesh_spec, specs in golden.items():
        assert full_size_specs(mesh_spec) == specs, mesh_spec


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps({m: full_size_specs(m) for m in ("fsdp=64", "fsdp=16,tensor=4")}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


@pytest.fixture(scope="module")
def vae_setup():
    from jaxedit.models.autoencoder import AutoEncoder

    cfg = get("flux-kontext-tiny").vae
    model = AutoEncoder(cfg)
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 48, 3)).astype(np.float32)
    params = sh.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731  (encode then decode)
    return boxed, params, x, fn, jax.jit(fn)(params, x)


@pytest.mark.parametrize("mesh_name", MESH_PARAMS)
def test_vae_round_trip_matches_unsharded(vae_setup, mesh_name):
    """The VAE's parameters are replicated; its batch splits over data x fsdp. XLA's CPU
    convolutions round differently for different batch sizes (batch 8 vs batch 1 differ by
    ~1.7e-6 on this random VAE, with no mesh at all), so the unsharded reference runs the
    same per-device batch size; the full-batch result must agree to 5e-6."""
    boxed, params, x, fn, ref_full = vae_setup
    mesh = sh.make_mesh(sh.MeshConfig.parse(MESHES[mesh_name]))
    with sh.activate(mesh):
        out = jax.jit(fn)(
            jax.device_put(params, sh.shardings(boxed, mesh)), jax.device_put(x, sh.batch_sharding(mesh, 4))
        )
    k = len(x) // (mesh.shape["data"] * mesh.shape["fsdp"])
    ref = np.concatenate([np.asarray(jax.jit(fn)(params, x[i : i + k])) for i in range(0, len(x), k)])
    assert rel_err(out, ref) <= 1e-6
    assert rel_err(out, ref_full) <= 5e-6


def test_make_mesh_never_silently_ignores_the_topology(monkeypatch):
    """When the topology-aware layout fails: CPU devices are reshaped (they have none), TPU devices raise
    naming the mesh, other accelerators warn."""
    import types

    from jax.experimental import mesh_utils

    from jaxedit.configs import MeshConfig

    def refuse(*args, **kw):
        raise ValueError("cannot tile the 2x2x1 torus")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
    mesh = sh.make_mesh(MeshConfig(fsdp=4), jax.devices()[:4])  # the fake CPU devices
    assert mesh.devices.shape == (1, 4, 1)
    tpus = [types.SimpleNamespace(platform="tpu", id=i) for i in range(4)]
    with pytest.raises(ValueError, match=r"does not fit the topology of these 4 tpu devices: cannot tile"):
        sh.make_mesh(MeshConfig(fsdp=2, tensor=2), tpus)
    gpus = [types.SimpleNamespace(platform="gpu", id=i) for i in range(4)]
    with pytest.warns(UserWarning, match="laying the devices out in id order"):
        arr = sh.physical_mesh([1, 4, 1], gpus, MeshConfig(fsdp=4))
    assert arr.shape == (1, 4, 1)
