"""`python -m train` / `python -m train.precompute` from a checkout: `jaxedit train` / `jaxedit precompute`."""
