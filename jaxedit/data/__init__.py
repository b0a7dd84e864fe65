"""Training data at pod scale: examples packed into ArrayRecord shards (`records`), packed from a manifest folder,
Parquet or webdataset tar shards (`sources`, `pack`), read by a grain pipeline that gives each jax process its own
share of every global batch and resumes exactly (`reader`), anywhere fsspec reaches (`paths`).

    jaxedit data pack --from parquet 'gs://bucket/edits/*.parquet' --out gs://bucket/packed \\
        --source-column source_image --target-column edited_image --instruction-column instruction
    jaxedit data info gs://bucket/packed
    jaxedit data verify gs://bucket/packed
    jaxedit train --config kontext_dev_lora --set data.path=gs://bucket/packed ...
"""
