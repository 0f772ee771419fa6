"""Namespace hosts that each have their own disk: ``tests/netns.py``'s cluster, every sshd in a private mount.

The hosts of ``NetnsCluster`` share the test machine's filesystem, so "a copy on every host" would
be one file written N times. Here every host's sshd starts in its own mount namespace with a
private tmpfs mounted at ``cluster.disk`` (one path, a different disk per host): whatever an SSH
session of host i writes under it is on host i only, and the test reads it back with
``disk_exec(i, ...)`` (``nsenter`` into that sshd's mount, network and UTS namespaces).

The tmpfs lives as long as the mount namespace, i.e. as long as a process of that host lives:
teardown kills them all (``NetnsCluster.teardown``), and the kernel frees the disk with them.
``netns.py`` is reused as is: only ``_start_sshds`` differs (the ``mount`` before ``exec sshd``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any, Callable, Iterator, Sequence

import pytest

from tests.netns import SSHD, NetnsCluster, require_netns


class DiskCluster(NetnsCluster):
    """``NetnsCluster`` whose hosts each see their own tmpfs of ``disk_mb`` MiB at ``self.disk``."""

    def __init__(self, n: int = 4, *, disk_mb: int = 1024, empty_bashrc: bool = False, **kw: Any) -> None:
        """``empty_bashrc``: each host sees an empty ~/.bashrc (bash sources it for every SSH command; this
        box's runs ``pyenv init``, ~0.3 s per session, where a Mac's default zsh reads nothing)."""
        super().__init__(n, **kw)
        self.disk_mb = disk_mb
        self.disk = ""
        self.empty_bashrc = empty_bashrc

    def _start_sshds(self) -> None:
        self.disk = tempfile.mkdtemp(prefix=f"orch-disk-{self.tag}-")  # the mount point: empty on the shared fs
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        rc = os.path.expanduser("~/.bashrc")
        quiet = ""
        if self.empty_bashrc and os.path.isfile(rc):
            empty = os.path.join(self.tmpdir, "empty-bashrc")
            open(empty, "w").close()
            quiet = f'mount --bind "{empty}" "{rc}" && '
        for h in self.hosts:
            log = open(h.sshd_log_path, "wb")
            try:
                p = subprocess.Popen(
                    ["ip", "netns", "exec", h.namespace, "unshare", "--uts", "--mount", "--propagation", "private",
                     "sh", "-c",
                     f'mount -t tmpfs -o size={self.disk_mb}m orchdisk "$1" && {quiet}hostname {h.name} '
                     f'&& exec {SSHD} -D -e -f "$0"', h.sshd_config_path, self.disk],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            finally:
                log.close()
            self._sshd_procs.append(p)  # ip netns exec, unshare and sh all exec(): p.pid is sshd's
            h.sshd_pid = p.pid
            self._record()

    def disk_prefix(self, i: int) -> list[str]:
        pid = self.hosts[i].sshd_pid
        return ["nsenter", "-t", str(pid), "-m", "-n", "-u", "--"]

    def disk_exec(self, i: int, argv: Sequence[str] | str, *, timeout: float = 60.0, check: bool = True,
                  **kw: Any) -> subprocess.CompletedProcess:
        """Run argv (a list, or a string for ``sh -c``) on host i, seeing its own disk."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        kw.setdefault("capture_output", not ("stdout" in kw or "stderr" in kw))
        kw.setdefault("text", True)
        return subprocess.run(self.disk_prefix(i) + list(argv), timeout=timeout, check=check, **kw)

    def sha256s(self, i: int, root: str) -> dict[str, str]:
        """{path under root: sha256} of every file under ``root`` on host i (hidden ``.orch-stage`` left out)."""
        p = self.disk_exec(i, f'cd "{root}" 2>/dev/null && find . -path ./.orch-stage -prune -o -type f -print0 '
                              '| xargs -0 -r sha256sum', check=False)
        out = {}
        for line in p.stdout.splitlines():
            digest, path = line.split(None, 1)
            out[path.strip()[2:]] = digest
        return out

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if self.disk and os.path.isdir(self.disk):
                try:
                    os.rmdir(self.disk)  # empty: the tmpfs was only ever mounted in the hosts' namespaces
                except OSError:
                    shutil.rmtree(self.disk, ignore_errors=True)


def make_disk_cluster_fixture(n: int, *, scope: str = "function", name: str | None = None,
                              **opts: Any) -> Callable:
    """A fixture giving a started ``DiskCluster(n)``, torn down at the end of ``scope``."""

    @pytest.fixture(scope=scope, name=name)
    def _fixture() -> Iterator[DiskCluster]:
        require_netns()
        c = DiskCluster(n, **opts)
        try:
            c.start()
            yield c
        finally:
            c.teardown()

    return _fixture
