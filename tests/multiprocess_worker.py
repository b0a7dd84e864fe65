"""One process of the 2-process test (tests/test_multiprocess.py): sharded forward and
SGD step of the shared sharding-test model over a global mesh, results saved as .npz."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxedit.parallel import distributed  # noqa: E402
from jaxedit.parallel import sharding as sh  # noqa: E402


def main(out_path: str, mesh_spec: str) -> None:
    assert distributed.initialize_from_env()
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    from tests.sharded_model import flat, model_and_data, train_step

    model, boxed, params, args, target, opt = model_and_data()
    mesh = sh.make_mesh(sh.MeshConfig.parse(mesh_spec))
    p_shard = sh.shardings(boxed, mesh)
    params_g = jax.tree.map(distributed.global_array, params, p_shard)
    args_g = [distributed.global_array(a, sh.batch_sharding(mesh, a.ndim)) for a in args]
    target_g = distributed.global_array(target, sh.batch_sharding(mesh, target.ndim))
    with sh.activate(mesh):
        opt_state = jax.jit(opt.init)(params_g)
        out = jax.jit(model.apply)({"params": params_g}, *args_g)
        new_params, _, loss, grads = jax.jit(train_step(model, opt))(params_g, opt_state, args_g, target_g)
    gather = lambda t: multihost_utils.process_allgather(t, tiled=True)  # noqa: E731
    np.savez(out_path, out=gather(out), loss=gather(loss), grads=flat(gather(grads)), params=flat(gather(new_params)))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
