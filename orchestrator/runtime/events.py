"""Send protocol events from inside a rank to the controller.

Events go to file descriptor 1 as whole lines (see ``orchestrator.protocol``).
We flush Python's own stdout first so an event never lands in the middle of
buffered user output. Outside ``orch`` (``ORCH_EVENTS`` unset) emitting is a
no-op, so recipes run unchanged under ``mlx.launch`` or plain ``python``.
"""

from __future__ import annotations

import os
import sys

from orchestrator import protocol

def enabled() -> bool:
    # Read each time: a pre-started rank gets its environment after this module is imported.
    return os.environ.get(protocol.ENV_EVENTS) == "1"


def rank() -> int:
    return int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)


def emit(kind: str, **fields) -> None:
    if not enabled():
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    line = protocol.encode(kind, rank(), **fields).encode()
    try:
        os.write(1, line)
    except OSError:
        # The controller went away; the guard is about to stop us anyway.
        pass
