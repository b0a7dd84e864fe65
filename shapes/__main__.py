"""`python -m shapes ...` (see shapes.cli)."""

import sys

from shapes.cli import main

sys.exit(main())
