"""`jaxedit data`: pack a dataset into record shards, print a packed dataset's index, verify its shards.

    jaxedit data pack --from folder DATA --out PACKED [--shard-size 1000] [--workers 4]
    jaxedit data pack --from parquet 'gs://b/edits/*.parquet' --out gs://b/packed --source-column src_img \\
        [--source-column ref_img] --target-column edited --instruction-column prompt [--id-column id]
    jaxedit data pack --from tar /data/shards/ --out PACKED      (webdataset: KEY.src.png, KEY.tgt.png, KEY.txt)
    jaxedit data info PACKED
    jaxedit data verify PACKED

Paths are local paths or fsspec URLs. Bad input stops with one line (exit code 2); `verify` exits 1 naming each
shard whose checksum differs from the index.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxedit.data import records, sources
from jaxedit.data.pack import pack
from jaxedit.data.records import BucketSettings


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def pack_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxedit data pack", description="Pack edit examples into ArrayRecord shards "
                                "(resumable: run it again after an interruption).")  # fmt: skip
    p.add_argument("inputs", nargs="+", help="folder: the dataset folder or manifest; parquet/tar: files, folders "
                   "or globs")  # fmt: skip
    p.add_argument("--from", dest="kind", choices=["folder", "parquet", "tar"], default="folder")
    p.add_argument("--out", required=True, help="the packed dataset's folder (local path or fsspec URL)")
    p.add_argument("--source-column", action="append", default=[], help="parquet: a source image column "
                   "(repeat for several sources, in order; default: source)")  # fmt: skip
    p.add_argument("--target-column", default="target", help="parquet: the target image column")
    p.add_argument("--instruction-column", default="instruction", help="parquet: the instruction column")
    p.add_argument("--id-column", default="", help="parquet: an id column (default FILE:ROW)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="folder: manifest lines a shard")
    p.add_argument("--workers", type=positive_int, default=4, help="shards written at once (threads)")
    p.add_argument("--pixel-budget", type=positive_int, default=512 * 512, help="the recorded buckets' area")
    p.add_argument("--bucket-step", type=positive_int, default=64)
    p.add_argument("--max-aspect", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.kind == "folder":
        if len(args.inputs) != 1:
            p.error("--from folder takes one dataset folder or manifest")
        source = sources.FolderSource(args.inputs[0], args.shard_size)
    elif args.kind == "parquet":
        cols = tuple(args.source_column or ["source"])
        source = sources.ParquetSource(tuple(args.inputs), cols, args.target_column, args.instruction_column,
                                       args.id_column)  # fmt: skip
    else:
        source = sources.TarSource(tuple(args.inputs))
    settings = BucketSettings(args.pixel_budget, args.bucket_step, args.max_aspect)
    try:
        summary = pack(source, args.out, settings, args.workers, f"{args.kind}: {' '.join(args.inputs)}")
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"packed {args.out}: {summary}")
    return 0


def info_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxedit data info", description="Print a packed dataset's index.")
    p.add_argument("dataset")
    args = p.parse_args(argv)
    try:
        print(records.describe(records.read_index(args.dataset)))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def verify_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxedit data verify", description="Check a packed dataset's shards against "
                                "the sha256 checksums and sizes of its index.")  # fmt: skip
    p.add_argument("dataset")
    args = p.parse_args(argv)
    try:
        index = records.read_index(args.dataset)
        bad = records.verify(args.dataset)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    if not bad:
        print(f"{args.dataset}: {len(index['shards'])} shards, {index['examples']} examples: checksums match")
    return 1 if bad else 0


MAINS = {"pack": pack_main, "info": info_main, "verify": verify_main}


def main(argv: list[str], prog: str = "jaxedit data") -> int:
    if not argv or argv[0] not in MAINS:
        print(__doc__.split("\n\n")[1], file=sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return MAINS[argv[0]](argv[1:])
