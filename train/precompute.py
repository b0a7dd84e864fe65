"""`python -m train.precompute --model FOLDER --data DATA --out CACHE` (see jaxedit.train.precompute)."""

import sys

from jaxedit.train.precompute import main

if __name__ == "__main__":
    sys.exit(main())
