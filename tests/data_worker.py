"""One process of tests/test_data_records.py's 2-process test: jax.distributed on localhost, the packed dataset's
iterator with this process's share (from jax.process_index), the ids of its first batches (and, after a restore
from the state saved mid-way, of the same batches again) written as JSON."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jaxedit.data import reader  # noqa: E402
from jaxedit.parallel import distributed  # noqa: E402
from jaxedit.train.data import DataConfig  # noqa: E402


def main(dataset: str, out: str, batches: int) -> None:
    assert distributed.initialize_from_env() and jax.process_count() == 2
    cfg = DataConfig(path=dataset, batch_size=4, pixel_budget=64 * 64, bucket_step=16, seed=2, num_threads=1)
    it, _ = reader.make_iterator(cfg)
    ids = [next(it)["id"] for _ in range(batches // 2)]
    state = json.loads(json.dumps(it.get_state()))
    ids += [next(it)["id"] for _ in range(batches - batches // 2)]
    again, _ = reader.make_iterator(cfg)
    again.set_state(state)
    resumed = [next(again)["id"] for _ in range(batches - batches // 2)]
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "ids": ids, "resumed": resumed}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
