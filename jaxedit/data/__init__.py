"""Training data at pod scale: examples packed into ArrayRecord shards (`records`), packed from a manifest folder,
Parquet or webdataset tar shards (`sources`, `pack`), read by a grain pipeline that gives each jax process its own
share of every global batch and resumes exactly (`reader`), anywhere fsspec reaches (`paths`); the encoder cache
of a packed dataset as record shards, each host encoding its share (`encode`), read in training (`cache`).

    jaxedit data pack --from parquet 'gs://bucket/edits/*.parquet' --out gs://bucket/packed \\
        --source-column source_image --target-column edited_image --instruction-column instruction
    jaxedit data info gs://bucket/packed
    jaxedit data verify gs://bucket/packed
    jaxedit precompute --model FOLDER --data gs://bucket/packed --out gs://bucket/cache --pixel-budget 1048576
    jaxedit train --config kontext_dev_lora --set data.path=gs://bucket/packed [--set data.cache=gs://bucket/cache]
"""
