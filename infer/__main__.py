"""`python -m infer edit ...` = `jaxedit edit ...`; `python -m infer --manifest ...` = `jaxedit batch ...`."""

import sys

from jaxedit.cli import main

argv = sys.argv[1:]
if argv[:1] in (["edit"], ["batch"], ["-h"], ["--help"], []):
    sys.exit(main(argv))
sys.exit(main(["batch", *argv]))
