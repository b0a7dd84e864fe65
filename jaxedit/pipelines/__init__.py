"""What every model family's editing pipeline shares: devices, meshes, parameter placement, images and
the compilation cache (`base`), loading a model folder as the right pipeline (`auto`), and batch jobs
over a manifest (`batch`). The families' pipelines live in `jaxedit.kontext` and `jaxedit.step1x`."""
