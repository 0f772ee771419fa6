"""End this process at once, after what it wrote to stdout and stderr is out (standard library only).

Two users, one reason each: the guard, whose rank has exited and been reaped, skips ~6 ms of
interpreter teardown that stood between a rank's end and the controller seeing it; an MPI rank
that failed must not reach the collective ``MPI_Finalize`` at exit, where it would wait forever
for peers blocked in a collective waiting for it (``bootstrap.py``).
"""

from __future__ import annotations

import os
import sys


def hard_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
