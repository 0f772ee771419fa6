"""Turn what a failed rank printed into a cause a person can act on (after exo's diagnostics).

Users of MLX's ring backend mostly see "Couldn't connect" and a hang; the
message alone names no address, no neighbour and no likely fix. The plan
knows which address each rank connects to, so a diagnosis can say
"rank 1 could not connect to rank 2 at 10.0.1.2:5001 (nobody listening)".

``classify(lines, rank, plan)`` returns the first matching ``Diagnosis`` (the
most specific patterns come first) or None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from orchestrator.errnos import BY_NUMBER as ERRNO  # errno -> words, Linux and macOS numbering


@dataclass
class Diagnosis:
    cause: str  # short machine-friendly key
    message: str  # one line for a person
    secondary: bool = False  # a consequence of another rank's failure


def _neighbour(rank: int, plan) -> tuple[Optional[int], str]:
    if plan is None or not getattr(plan, "ranks", None):
        return None, "its right neighbour"
    right = (rank + 1) % len(plan.ranks)
    addrs = ",".join(plan.ranks[right].listen) or "?"
    return right, f"rank {right} at {addrs} (host {plan.ranks[right].host})"


def _own_address(rank: int, plan) -> str:
    if plan is None or not getattr(plan, "ranks", None) or rank >= len(plan.ranks):
        return "its listen address"
    return ",".join(plan.ranks[rank].listen) or "its listen address"


def classify(lines: Iterable[str], rank: int = 0, plan=None, signal: Optional[int] = None,
             initialised: Optional[bool] = None) -> Optional[Diagnosis]:
    lines = list(lines)
    if getattr(plan, "backend", None):
        from orchestrator import backends

        f = backends.get(plan.backend).classify(lines, rank, plan, signal=signal, initialised=initialised)
        if f is not None:  # what only this backend's failures mean (JACCL's)
            return Diagnosis(f.cause, f.message, f.secondary)
    text = "\n".join(lines)

    m = re.search(r"\[ring\] Couldn't connect \(error: (\d+)\)", text)
    if m:
        err = int(m.group(1))
        _, who = _neighbour(rank, plan)
        return Diagnosis(
            "ring_connect",
            f"ring: rank {rank} could not connect to {who} ({ERRNO.get(err, f'errno {err}')}) after MLX's 31 s of retries; "
            "check that rank is running and listens on that address, and that the address is reachable from this host "
            "(orch check tests every link)",
        )
    m = re.search(r"\[ring\] Couldn't bind socket \(error: (\d+)\)", text)
    if m:
        err = int(m.group(1))
        return Diagnosis(
            "ring_bind",
            f"ring: rank {rank} could not listen on {_own_address(rank, plan)} ({ERRNO.get(err, f'errno {err}')}); "
            "another process holds the port or the address is not on this host",
        )
    if re.search(r"\[ring\] (connection to a peer was lost|Socket \d+ was closed by the peer|Too many send/recv errors)", text):
        return Diagnosis(
            "ring_peer_lost",
            f"ring: rank {rank} lost the connection to a neighbour (a peer rank died or a link went down)",
            secondary=True,
        )
    if "quiet wait: a rank of this machine left the barrier" in text:  # runtime/quiet_wait.py
        return Diagnosis(
            "quiet_wait_peer_lost",
            f"rank {rank} stopped waiting for a rank of its machine that ended (see that rank for the cause)",
            secondary=True,
        )
    if re.search(r"stopping: \d+ other rank\(s\) failed", text):
        # The runtime's _stop_together: this rank had no problem of its own and stopped
        # with the one that did (which printed the real error).
        return Diagnosis(
            "peer_failed",
            f"rank {rank} stopped because another rank failed (see that rank's output for the cause)",
            secondary=True,
        )
    m = re.search(r"\[METAL\] Command buffer execution failed: ([^(\n]+)\(([0-9a-f]+):(\w+)\)", text)
    if m:
        what, code = m.group(1).strip(), m.group(3)
        if "OutOfMemory" in code or "Insufficient Memory" in what:
            return Diagnosis("metal_oom", f"Metal: rank {rank} ran out of GPU memory ({code}); lower the batch size or the model size")
        if "Timeout" in code or "Timeout" in what:
            return Diagnosis(
                "metal_timeout",
                f"Metal: a GPU command buffer on rank {rank} ran too long and was killed ({code}); "
                "split large evaluations or reduce per-step work",
            )
        return Diagnosis("metal_error", f"Metal: command buffer failed on rank {rank}: {what} ({code})")
    if re.search(r"\[metal::malloc\]|std::bad_alloc|MemoryError", text):
        return Diagnosis("oom", f"rank {rank} ran out of memory; lower the batch size or the model size")
    m = re.search(r"ModuleNotFoundError: No module named '([^']+)'", text)
    if m:
        mod = m.group(1)
        return Diagnosis(
            "import_error",
            f"rank {rank}'s python has no module '{mod}'; install it there (pip install {mod.split('.')[0]}) "
            "or point --python / the hostfile's \"python\" at an environment that has it",
        )
    if re.search(r"attempted to initialize\s+MPI .*more than once", text, re.S):
        return Diagnosis(
            "mpi_double_init",
            f"MPI: rank {rank} initialised MPI twice (mpi4py imported before MLX's init); "
            "run through orch --backend mpi, or set mpi4py.rc.initialize = False",
        )
    if re.search(r"Cannot initialize MPI|\[mpi\] Couldn't load|libmpi", text):
        return Diagnosis(
            "mpi_init",
            f"MPI: rank {rank} could not initialise MPI; check that Open MPI is installed on every host "
            "and MLX_MPI_LIBNAME names its libmpi",
        )
    return None
