"""`python -m jaxedit ...`: the `jaxedit` command (see jaxedit.cli)."""

import sys

from jaxedit.cli import main

sys.exit(main())
