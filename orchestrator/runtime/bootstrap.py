"""Start a user's script as one rank: ``python -m orchestrator.runtime.bootstrap SCRIPT ARGS...``.

The script runs unchanged (as ``__main__``, with its own ``sys.argv``), so any
script written for ``mlx.launch`` works. Around it the bootstrap

* materialises ``MLX_HOSTFILE`` from ``ORCH_MLX_HOSTFILE_JSON`` when the
  controller could not write a file on this host;
* wraps ``mx.distributed.init`` to report ``init_start`` / ``ready`` events
  (the supervisor's init timeout names the ranks that never got ready) and,
  for the one rank that connects first, to wait at the start gate until its
  peers listen (the guard watches for that: MLX holds the GIL inside init, so
  no thread in this process could).
  That gate is what saves the ~1 s MLX loses when a rank connects before its
  neighbour listens and the ring backs off.
"""

from __future__ import annotations

import os
import runpy
import select
import sys
import tempfile
import time

from orchestrator.runtime import events


def _materialise_hostfile() -> None:
    content = os.environ.pop("ORCH_MLX_HOSTFILE_JSON", None)
    if content is None:
        return
    fd, path = tempfile.mkstemp(prefix="mlx-hostfile-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.environ["MLX_HOSTFILE"] = path


def _wait_gate(timeout_s: float) -> None:
    fd = os.environ.get("ORCH_GATE_FD")
    if fd is None:
        return
    fd = int(fd)
    try:
        select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
        os.environ.pop("ORCH_GATE_FD", None)


def _install_init_hook() -> None:
    try:
        import mlx.core as mx
    except ImportError:
        return
    real_init = mx.distributed.init
    state = {"done": False}

    def init(*args, **kwargs):
        if state["done"]:
            return real_init(*args, **kwargs)
        backend = kwargs.get("backend", args[1] if len(args) > 1 else "any")
        events.emit("init_start", backend=str(backend))
        t0 = time.monotonic()
        _wait_gate(float(os.environ.get("ORCH_GATE_TIMEOUT", "10")))
        group = real_init(*args, **kwargs)
        state["done"] = True
        events.emit("ready", size=group.size(), init_s=round(time.monotonic() - t0, 4))
        return group

    mx.distributed.init = init


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -m orchestrator.runtime.bootstrap SCRIPT [ARGS...]", file=sys.stderr)
        sys.exit(2)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    _materialise_hostfile()
    if events.enabled():
        _install_init_hook()
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
