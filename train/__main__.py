"""`python -m train --config configs/<name>.py [--set key=value ...]` (see jaxedit.train.loop)."""

import sys

from jaxedit.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
