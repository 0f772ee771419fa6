"""Start local ranks *before* the controller has finished starting itself.

The controller spends ~0.3 s importing pydantic and asyncio and planning; a rank
spends ~0.2 s starting Python and importing MLX. Done one after the other that
is most of a small job's launch time, so for ``orch run -n N`` the CLI calls
``start(N)`` first thing, with nothing but the standard library loaded: N
guards in ``--deferred`` mode, each with its rank already importing MLX. When
the plan is ready, the local launcher ``take()``s one per rank and sends its
configuration as one JSON line; if the run never starts, closing their stdin
(or this process exiting) makes the guards stop their ranks.

The launcher waits on these processes through a pidfd (Linux) or a thread in waitpid (macOS).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from orchestrator import protocol

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_pool: list[subprocess.Popen] = []


def supported() -> bool:
    return os.environ.get(protocol.ENV_PRESPAWN, "1") != "0"


def start(n: int, python: str = sys.executable) -> None:
    if not supported() or n < 1 or n > 64:
        return
    env = dict(os.environ)
    env.pop("MLX_HOSTFILE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.update({"PYTHONUNBUFFERED": "1", protocol.ENV_EVENTS: "1"})
    argv = [python, "-S", "-m", "orchestrator.runtime.guard", "--deferred", "--",
            python, "-m", "orchestrator.runtime.bootstrap"]
    for _ in range(n):
        try:
            _pool.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=env, start_new_session=True))
        except OSError:
            break


def take() -> Optional[subprocess.Popen]:
    return _pool.pop(0) if _pool else None


def discard() -> None:
    """Stop what was started but not used."""
    while _pool:
        close(_pool.pop())


def close(p: subprocess.Popen, timeout: float = 5.0) -> None:
    """End a pre-started guard nobody adopted: EOF on its stdin makes it stop its rank; a bounded wait, then SIGKILL."""
    for f in (p.stdin, p.stdout, p.stderr):
        try:
            f.close()
        except (OSError, ValueError):
            pass
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=timeout)
