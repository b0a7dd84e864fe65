"""Run a command in this process and SIGKILL it at a named point (the fault tests' abrupt stops).

    python -m tests.kill_at POINT MODULE [ARGS...]     # runs `python -m MODULE ARGS...`, killed at POINT
    python -m tests.kill_at POINT write_part FOLDER PART   # replaces FOLDER/PART with its parameters + 1

POINT: `unsealed` (a checkpoint written, its seal not yet: inside the first `seal`), `swap` (a folder
replacement cut between its two renames: the old copy moved aside, the new one not yet renamed in)."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    import jaxedit.checkpoint as ck

    if point == "unsealed":
        ck.seal = die
    elif point == "swap":
        rename = Path.rename

        def cut(self, target):
            out = rename(self, target)
            if Path(target).name.endswith(".old"):
                die()
            return out

        Path.rename = cut
    else:
        raise SystemExit(f"unknown point {point}")


if __name__ == "__main__":
    point, what, *args = sys.argv[1:]
    arm(point)
    if what == "write_part":
        import jax

        from jaxedit import model_folder
        from jaxedit.checkpoint import load_params

        folder, part = Path(args[0]), args[1]
        new = jax.tree.map(lambda a: a + 1, load_params(folder / part))
        model_folder.write_part(folder, part, new)
    else:
        sys.argv = [what, *args]
        runpy.run_module(what, run_name="__main__")
    print("finished without being killed")
