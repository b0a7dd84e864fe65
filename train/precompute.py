"""`python -m train.precompute --model FOLDER --data DATA --out CACHE` = `jaxedit precompute ...`."""

import sys

from jaxedit.cli import main

if __name__ == "__main__":
    sys.exit(main(["precompute", *sys.argv[1:]]))
