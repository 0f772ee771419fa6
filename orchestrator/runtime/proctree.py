"""The rank's process tree, as the guard sees it: who belongs to the rank, and how to kill all of them.

A rank may leave descendants the guard must still reach: data-loader workers
(same process group), a ``setsid`` daemon or a double fork (a new group,
re-parented away from the rank). So:

* Linux: the guard makes itself a *child subreaper* before it starts the rank
  (``become_subreaper``): every orphaned descendant is re-parented to the
  guard instead of to init, and a live ``/proc`` walk below the guard is exact.
  The rank also gets ``PR_SET_PDEATHSIG`` (``die_with_parent``), so a guard
  killed with SIGKILL takes its rank with it.
* macOS has neither: ``Tree`` snapshots the process table with ``ps`` (every
  ``TREE_EVERY_S`` and before each kill) and keeps every descendant of the
  rank it has seen while it is alive; one started and orphaned between two
  snapshots can escape.

``Tree.signal`` reaches the rank's group plus every member; ``Tree.kill``
repeats SIGKILL until nothing is left; ``Tree.terminate`` is SIGTERM, the
grace, then ``kill``. ``bind_cpus`` places the rank on its share of the CPUs.

Standard library only, on every platform branch: the guard imports this under
``python -S`` (see ``runtime/guard.py``). Platform checks read ``sys.platform``
at call time, so tests can force the macOS branch on Linux.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

TREE_EVERY_S = 1.0  # macOS: process-tree snapshots
KILL_ROUNDS = 100  # SIGKILL sweeps (20 ms apart) until nothing of the rank is left

_LINUX_PR_SET_PDEATHSIG = 1
_LINUX_PR_SET_DUMPABLE = 4
_LINUX_PR_SET_CHILD_SUBREAPER = 36


def linux() -> bool:
    return sys.platform.startswith("linux")


def run_tool(argv: list[str]) -> Optional[subprocess.CompletedProcess]:
    """A small helper command (lsof, ps), bounded; None if it cannot run."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


# ---- Linux process controls ------------------------------------------------------

def _prctl(option: int, value: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Linux: orphaned descendants come to us, not to init. False elsewhere (macOS: ``Tree`` snapshots)."""
    return linux() and _prctl(_LINUX_PR_SET_CHILD_SUBREAPER, 1)


def not_dumpable() -> None:
    """Linux: a same-user rank cannot read our memory (the token) through /proc."""
    if linux():
        _prctl(_LINUX_PR_SET_DUMPABLE, 0)


def die_with_parent() -> Optional[Callable[[], None]]:
    """Linux: a ``preexec_fn`` that makes the child die with us, even if we are SIGKILLed; None elsewhere."""
    if not linux():
        return None
    parent = os.getpid()

    def in_child() -> None:
        _prctl(_LINUX_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # we died before the flag was set
            os._exit(1)

    return in_child


def bind_cpus(pid: int, spec: str) -> None:
    """Pin ``pid`` to its share of this host's CPUs; ``spec`` is "i/n" (local rank i of n).

    Contiguous blocks keep a rank's threads on neighbouring cores. Linux only:
    macOS has no CPU affinity API, so there ``--bind`` is a no-op.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    i, n = (int(x) for x in spec.split("/"))
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // n)
    mine = cpus[i * per:(i + 1) * per] or [cpus[i % len(cpus)]]
    try:
        os.sched_setaffinity(pid, mine)
    except OSError:
        pass


# ---- the process table -----------------------------------------------------------

def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every live (not zombie) process this user can see; {} if unknown."""
    table: dict[int, tuple[int, int]] = {}
    if linux():
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if len(fields) > 2 and fields[0] != b"Z":
                table[int(name)] = (int(fields[1]), int(fields[2]))
        return table
    r = run_tool(["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="])
    for line in (r.stdout.splitlines() if r is not None else ()):
        parts = line.split()
        if len(parts) >= 4 and all(p.isdigit() for p in parts[:3]) and not parts[3].startswith("Z"):
            table[int(parts[0])] = (int(parts[1]), int(parts[2]))
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """Every process below ``roots`` in ``table`` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in found and c not in roots:
                found.add(c)
                todo.append(c)
    return found


class Tree:
    """Everything the rank started, wherever it went: what ``members()`` returns gets signalled.

    Linux: the guard is a subreaper (set before the rank starts), so every
    descendant of the rank stays a descendant of the guard and the live
    ``/proc`` walk is exact. macOS: the rank's process group plus its
    descendants as seen by snapshots (``members()`` every second and before
    each kill); a pid seen once is kept while it is alive and its parent is the
    one we saw or launchd (it was orphaned), not once the pid is reused.
    The rank leads its own session, so its pid is its process group's id.
    """

    def __init__(self, rank_pid: int, subreaper: bool) -> None:
        self.rank_pid = rank_pid
        self.subreaper = subreaper
        self.known: dict[int, int] = {}  # macOS: pid -> the parent we saw

    def members(self) -> set[int]:
        """The live (not zombie) processes of the rank: itself, its group, its descendants."""
        table = process_table()
        me = os.getpid()
        group = {p for p, (_, pgid) in table.items() if pgid == self.rank_pid}
        if self.subreaper:
            return (descendants({me}, table) | group) - {me}
        if not table:  # ps failed this time: keep what we knew
            return set(self.known) | {self.rank_pid}
        self.known = {p: pp for p, pp in self.known.items() if p in table and table[p][0] in (pp, 1)}
        for pid in descendants({self.rank_pid, *self.known, *group}, table):
            self.known.setdefault(pid, table[pid][0])
        alive = set(self.known) | group
        if self.rank_pid in table:
            alive.add(self.rank_pid)
        return alive - {me}

    # -- signalling everything the rank started
    def signal(self, sig: int) -> bool:
        """``sig`` to the rank's group and every member of its tree; whether any live one was there."""
        # Look first: on macOS a daemon whose parent dies of this very signal is re-parented to launchd.
        members = self.members()
        try:
            os.killpg(self.rank_pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in members:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return bool(members)

    def kill(self, rank_done: Callable[[], bool]) -> None:
        """SIGKILL until nothing of the rank is left and ``rank_done()`` (which reaps) says it exited. Bounded."""
        for _ in range(KILL_ROUNDS):
            found = self.signal(signal.SIGKILL)
            done = rank_done()
            if not found and done:
                return
            time.sleep(0.02)

    def terminate(self, grace_s: float, rank_done: Callable[[], bool]) -> None:
        """SIGTERM (and SIGCONT: a held or stopped rank must run to act on it), SIGKILL after the grace."""
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)
        end = time.monotonic() + grace_s
        while time.monotonic() < end and not rank_done():
            time.sleep(min(0.02, max(0.0, end - time.monotonic())))
        self.kill(rank_done)
