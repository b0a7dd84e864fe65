"""Cache text embeddings and VAE latents of a dataset, so training never runs the encoders.

    python -m train.precompute --model FOLDER --data DATA --out CACHE [--pixel-budget N --bucket-step S]

Then train with `--set data.cache=CACHE` (the same data.path, pixel_budget and bucket_step:
the cache is keyed by the indexed items and checked against them). CACHE holds
  cache.json                  model folder, manifest, item ids (index order), buckets
  txt.npy [N, Lt, D] y.npy [N, Dy]        text embeddings of each item's instruction
  empty_txt.npy empty_y.npy               the empty prompt's (prompt dropout)
  reference_WxH.npy target_WxH.npy        VAE latents (posterior mean) per bucket [n_b, H/8, W/8, C]
  rows.npy [N]                            each item's row in its bucket's arrays
Items of several sources are cached per group (`data.group_name`: target bucket and source buckets):
  target_G.npy reference_G.npy reference_1_G.npy ...   with G = WxH_from_W1xH1+W2xH2...

A packed dataset (`jaxedit data pack`: --data holds index.json): CACHE gets the same arrays as record shards,
one record per example keyed by its record number and id (`jaxedit.data.cache`), its index naming the dataset's
shard checksums and the model parts' digests; under `jax.distributed` (`--distributed`) every process encodes its
share on its local devices. Train with the same data.path and `--set data.cache=CACHE`.

Step1X-Edit folders: CACHE gets each item's Qwen2.5-VL output of (instruction, source image at its
bucket size) and of ("", source image), one .npz per (prompt, image) as training's per-item cache
names them: train with `--set qwen_cache=CACHE`. The JAX Qwen2.5-VL runs `--batch` items at once,
its weights sharded over the local devices (`--mesh`, default every device on fsdp).
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxedit import families, model_folder
from jaxedit.train.data import DataConfig


def precompute(
    model: str | Path, data: DataConfig, out: str | Path, batch: int = 64, mesh: str = "", shard_size: int = 256
) -> dict:
    """Write the cache of the model folder's family (`jaxedit.families.Family.precompute`: FLUX.1 Kontext's in
    `jaxedit.kontext.precompute`, Step1X-Edit's in `jaxedit.step1x.precompute`); its summary (ids, seconds).
    A packed dataset's cache is record shards at `out` (a local path or fsspec URL), this process writing its
    share (`jaxedit.data.encode`)."""
    folder = Path(model)
    out = str(out) if "://" in str(out) else Path(out)
    preset = model_folder.read_description(folder)
    return families.of(preset).precompute(folder, preset, data, out, batch, mesh, shard_size)


def main(argv: list[str] | None = None, prog: str = "python -m train.precompute") -> int:
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="jaxedit model folder (text encoders + VAE)")
    p.add_argument("--data", required=True, help="dataset folder with manifest.jsonl (or the manifest), or a packed "
                   "dataset (index.json)")  # fmt: skip
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--pixel-budget", type=int, default=DataConfig.pixel_budget, help="max bucket area in pixels")
    p.add_argument("--bucket-step", type=int, default=DataConfig.bucket_step, help="bucket widths: multiples of this")
    p.add_argument("--batch", type=int, default=64, help="items encoded at once (Step1X-Edit: try 8)")
    p.add_argument("--shard-size", type=int, default=256, help="packed dataset: examples a cache shard")
    p.add_argument("--distributed", action="store_true", help="packed dataset: jax.distributed.initialize() "
                   "first (auto-detected on TPU pods; else set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                   "JAX_PROCESS_ID)")  # fmt: skip
    p.add_argument("--mesh", default="", help="Step1X-Edit: mesh of the Qwen2.5-VL (default: every device on fsdp)")
    args = p.parse_args(argv)
    data = DataConfig(path=args.data, pixel_budget=args.pixel_budget, bucket_step=args.bucket_step)
    from jaxedit.parallel.distributed import initialize_from_env

    initialize_from_env(auto=args.distributed)  # (JAX_COORDINATOR_ADDRESS ... set, or --distributed on a pod)
    try:
        from jaxedit.pipelines.batch import check_output_dir

        if "://" not in args.out:
            check_output_dir(Path(args.out))
        meta = precompute(args.model, data, args.out, args.batch, args.mesh, args.shard_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if meta.get("index", True) is None:  # a packed dataset's cache: another process writes the index
        print(f"cached this process's share in {args.out} ({meta['seconds']:.0f} s)", flush=True)
    else:
        print(f"cached {len(meta['ids'])} items in {args.out} ({meta['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
