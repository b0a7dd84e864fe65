"""`python -m infer` from a checkout: the `jaxedit edit` / `jaxedit batch` commands (jaxedit.cli)."""
