"""What the guard can see of any rank from outside: memory, CPU time, whether it is stopped.

With ``ORCH_GUARD_RSS=1`` the guard sends one ``rss`` event every
``RSS_EVERY_S`` (``sample``), for any program, ours or not: the live view and
summary show memory, and the controller's idle-hang watchdog reads the CPU
time. CPU time is the whole tree's (``runtime/proctree.py``), so a rank whose
work runs in a child (a shell script, a data loader) still shows progress.
``is_stopped`` also answers the ring start's hold and the ``dump`` request (a
stopped process runs no signal handler).

Linux reads ``/proc``; macOS runs ``ps`` (one ``ps`` for all three values in
``ps_sample``: each costs 5-10 ms). Standard library only, on every platform
branch: the guard imports this under ``python -S``; ``sys.platform`` is read at
call time, so tests force the macOS branch on Linux (procps' ``ps`` answers).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from orchestrator.runtime.proctree import linux, run_tool

RSS_EVERY_S = 2.0


def maxrss_bytes(ru_maxrss: int) -> int:
    """``ru_maxrss`` of a reaped rank in bytes: Linux counts KiB, macOS bytes (getrusage(2) of each)."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def is_stopped(pid: int) -> bool:
    if linux():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
        except (OSError, IndexError):
            return False
    r = run_tool(["ps", "-o", "stat=", "-p", str(pid)])
    return r is not None and r.returncode == 0 and r.stdout.strip().startswith("T")


def rss_bytes(pids: list[int]) -> dict[int, int]:
    """Resident set size of each pid that still exists."""
    out: dict[int, int] = {}
    if linux():
        page = os.sysconf("SC_PAGE_SIZE")
        for pid in pids:
            try:
                with open(f"/proc/{pid}/statm") as f:
                    out[pid] = int(f.read().split()[1]) * page
            except (OSError, IndexError, ValueError):
                pass
        return out
    if not pids:
        return out
    r = run_tool(["ps", "-o", "pid=,rss=", "-p", ",".join(map(str, pids))])
    for line in (r.stdout.splitlines() if r is not None else ()):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = int(parts[1]) * 1024  # ps reports KiB
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU time (user + system, seconds) each pid that still exists has used.

    Linux: ``/proc/<pid>/stat``, with the time of its exited children it has
    waited for (``cutime``/``cstime``), so a shell loop of short commands shows
    progress too. macOS: ``ps -o time=`` (the process itself only).
    """
    out: dict[int, float] = {}
    if linux():
        tick = os.sysconf("SC_CLK_TCK")
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
                out[pid] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
            except (OSError, IndexError, ValueError):
                pass
        return out
    if not pids:
        return out
    r = run_tool(["ps", "-o", "pid=,time=", "-p", ",".join(map(str, pids))])
    for line in (r.stdout.splitlines() if r is not None else ()):
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            secs = parse_ps_time(parts[1])
            if secs is not None:
                out[int(parts[0])] = secs
    return out


def ps_sample(pids: list[int]) -> tuple[dict[int, int], dict[int, float], set[int]]:
    """macOS: RSS (bytes), CPU time (s) and the stopped ones of ``pids``, from one ``ps``."""
    sizes: dict[int, int] = {}
    cpu: dict[int, float] = {}
    stopped: set[int] = set()
    if not pids:
        return sizes, cpu, stopped
    r = run_tool(["ps", "-o", "pid=,rss=,time=,stat=", "-p", ",".join(map(str, pids))])
    for line in (r.stdout.splitlines() if r is not None else ()):
        parts = line.split()
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        pid = int(parts[0])
        sizes[pid] = int(parts[1]) * 1024  # ps reports KiB
        secs = parse_ps_time(parts[2])
        if secs is not None:
            cpu[pid] = secs
        if parts[3].startswith("T"):
            stopped.add(pid)
    return sizes, cpu, stopped


def parse_ps_time(text: str) -> Optional[float]:
    """``ps``'s cumulative CPU time: macOS ``M:SS.ss`` (minutes may pass 59), procps ``[DD-]HH:MM:SS``."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not rest or len(parts) > 3:
        return None
    try:
        total = 0.0
        for part in parts:
            if not part.replace(".", "", 1).isdigit():
                return None
            total = total * 60 + float(part)
        return total + (int(days) * 86400 if days else 0)
    except ValueError:
        return None


def system_available_bytes() -> Optional[int]:
    """Linux: MemAvailable. macOS: None (no recorded vm_stat output to parse against yet)."""
    if not linux():
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def sample(pid: int, members: set[int]) -> Optional[dict]:
    """The ``rss`` event's fields for rank ``pid`` and its tree ``members``; None once the rank is gone."""
    pids = sorted(members | {pid})
    if linux():
        sizes = rss_bytes(pids)
        cpu = cpu_seconds(pids) if pid in sizes else {}
        stopped = is_stopped(pid)
    else:  # one ps for all three (each ps costs 5-10 ms)
        sizes, cpu, stopped_pids = ps_sample(pids)
        stopped = pid in stopped_pids
    if pid not in sizes:
        return None
    return {"rss_bytes": sizes[pid], "tree_rss_bytes": sum(sizes.values()),
            "system_available_bytes": system_available_bytes(),
            "cpu_s": round(sum(cpu.values()), 3) if pid in cpu else None, "stopped": stopped}
