"""A memory cgroup per network-namespace host, with the limit the host's ranks inherit and can read.

``host_memory_limits(cluster, limit)`` gives every host of a ``tests.netns`` cluster its "RAM":

* a cgroup with the limit (``tests.test_runtime_memfit._memory_cgroup``: v1 ``memory.limit_in_bytes``
  or v2 ``memory.max``), and the host's sshd moved into a child cgroup of it without a limit of its
  own, as systemd puts a session scope under a user slice with ``MemoryMax``. Everything that sshd
  starts from then on (the session, orch's guard, the rank) is in that child and under the parent's
  limit: the kernel OOM-kills there, and ``memfit.cgroup_memory`` must look up the hierarchy to see it.
* the cgroup tree mounted inside the host's mount namespace. ``ip netns exec`` (how ``tests/netns.py``
  starts sshd) remounts ``/sys`` without the cgroup mounts, so a rank would see no limit at all and
  plan for the whole machine; a real Linux host has ``/sys/fs/cgroup`` mounted. The mounts live in
  the namespace only (``ip netns exec`` made ``/`` a slave: nothing propagates back) and go with it.

Cleanup runs whatever happens: every process still in a host's cgroups goes back to the cgroup sshd came
from, then the cgroups are removed (bounded, ``_remove_cgroup``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

from tests.test_memfit_netns import MEMCG_ROOT, _memory_cgroup_of
from tests.test_runtime_memfit import _memory_cgroup, _remove_cgroup

V2_ROOT = Path("/sys/fs/cgroup")


def _mount_cgroups_in(pid: int, v1: bool) -> None:
    """The memory hierarchy at ``/sys/fs/cgroup[/memory]`` in ``pid``'s mount namespace (as on the host)."""
    script = ("mount -t tmpfs orch-cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/memory && "
              "mount -t cgroup -o memory cgroup /sys/fs/cgroup/memory") if v1 else \
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup"
    subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", "sh", "-c", script], check=True,
                   capture_output=True, text=True, timeout=20)


def _processes(cg: Path) -> list[str]:
    try:
        return (cg / "cgroup.procs").read_text().split()
    except OSError:
        return []


@contextlib.contextmanager
def host_memory_limits(cluster, limit: int) -> Iterator[list[Path]]:
    """Each host's sshd under a cgroup limited to ``limit`` bytes; yields the limited cgroups, host by host."""
    made: list[tuple[Path, Path, Path]] = []  # (limited cgroup, sshd's child, where sshd came from)
    try:
        for h in cluster.hosts:
            cg = _memory_cgroup(limit)
            v1 = cg.parent == MEMCG_ROOT
            home = MEMCG_ROOT / _memory_cgroup_of(h.sshd_pid).lstrip("/") if v1 else \
                V2_ROOT / _v2_cgroup_of(h.sshd_pid).lstrip("/")
            child = cg / "sshd"
            made.append((cg, child, home))  # before anything can fail: the finally removes it
            child.mkdir()
            (child / "cgroup.procs").write_text(str(h.sshd_pid))
            _mount_cgroups_in(h.sshd_pid, v1)
        yield [cg for cg, _, _ in made]
    finally:
        for cg, child, home in made:
            for d in (child, cg):
                for pid in _processes(d):
                    with contextlib.suppress(OSError):  # gone meanwhile
                        (home / "cgroup.procs").write_text(pid)
            for d in (child, cg):
                _remove_cgroup(d)


def _v2_cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"pid {pid} has no cgroup2 path")


def _counter(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    raise AssertionError(f"{path} has no {key}")


def oom_kills(cg: Path) -> int:
    """How many processes the kernel's OOM killer ended in ``cg`` and below it: v2's ``memory.events`` counts
    the subtree, v1's ``memory.oom_control`` only the cgroup the victim was in (here sshd's child)."""
    if (cg / "memory.events").exists():
        return _counter(cg / "memory.events", "oom_kill")
    return sum(_counter(Path(d) / "memory.oom_control", "oom_kill") for d, _, _ in os.walk(cg))
