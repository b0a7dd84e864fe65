"""`python -m train --config NAME_OR_FILE [--set key=value ...]` = `jaxedit train ...` (jaxedit.cli)."""

import sys

from jaxedit.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
