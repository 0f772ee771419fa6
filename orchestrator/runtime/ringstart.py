"""The ring start, inside the rank: the gate, the init byte, the listening watch and the hold.

The controller's half (which rank is gated, which is held, when to send
``go`` and ``release``) is ``orchestrator/ringstart.py``; its docstring says
why the ring start needs any of this. This module is the other half, in two
processes:

* the **rank** (``runtime/bootstrap.py``'s ``mx.distributed.init`` hook):
  ``signal_init`` writes ``protocol.INIT_BYTE`` to ``ENV_INIT_FD`` right before
  the real init (or closes it: this rank will never init), and a gated rank
  first waits at its gate, ``wait_gate``, for ``protocol.GATE_LINE``;
* the **guard** (``runtime/guard.py``): ``RankStart`` makes those two pipes,
  opens the gate on ``go``, watches for the rank's listening socket from the
  init byte on (MLX holds the GIL inside init, so no thread in the rank could
  say so) and reports it, and holds rank 0 (SIGSTOP in ``accept()``) until
  ``release`` or ``HOLD_MAX_S``.

The hold (``ORCH_HOLD=1``, rank 0 of a ring): once the rank listens the guard
SIGSTOPs it inside ``accept()``; the kernel still completes the first
connect into the backlog, and ``release`` (or ``ORCH_HOLD_MAX_S``, default
10 s) lets it run on. What we found about holding too late: MLX closes its
listening socket right after ``accept`` returns, but between the guard seeing
LISTEN and its SIGSTOP landing, the rank may have accepted, closed and moved
on (its peer connects as soon as the gate opens, or after the gate's own
timeout); the old check also matched *any* socket on the host on that port,
so a stale or foreign listener could trigger a hold at any time, even mid
training; and a ``release`` that came before such a late hold was ignored,
so the rank stayed stopped for the whole bound while its peers waited in a
collective. So now: no hold once ``release`` was seen; after the SIGSTOP the
guard waits until the rank is really stopped and then checks, with the rank
frozen, that its socket is still in LISTEN and that it owns no accepted
connection on that port; otherwise it resumes it at once. A hold is always
bounded, and a stop resumes the group before terminating it.

Standard library only, like the guard, which imports it under ``python -S``
the way it imports ``orchestrator.protocol`` (``orchestrator.runtime``'s
``__init__`` imports nothing heavy).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Callable, Mapping, MutableMapping, Optional

from orchestrator import protocol

WATCH_FIRST_S = 0.001
WATCH_MAX_STEP_S = 0.05
WATCH_TOTAL_S = 120.0
STOPPED_WAIT_S = 1.0


def _linux() -> bool:
    return sys.platform.startswith("linux")


# ---- the rank's side (bootstrap) ------------------------------------------------

_init_fd: list[int] = []  # the guard's "about to init" pipe, until used


def take_init_fd() -> None:
    """Take the init pipe out of the environment first thing (the program must not inherit it)."""
    fd = os.environ.pop(protocol.ENV_INIT_FD, None)
    if fd is not None and fd.isdigit():
        _init_fd.append(int(fd))


def signal_init(byte: bytes = protocol.INIT_BYTE) -> None:
    """Tell the guard that init begins (``byte``), or that it never will (``b""``: just close)."""
    while _init_fd:
        fd = _init_fd.pop()
        try:
            if byte:
                os.write(fd, byte)
        except OSError:
            pass
        try:
            os.close(fd)
        except OSError:
            pass


def wait_gate(timeout_s: Optional[float] = None) -> None:
    """A gated rank: wait (bounded) until the guard opens the gate, i.e. every peer listens."""
    fd = os.environ.get(protocol.ENV_GATE_FD)
    if fd is None:
        return
    if timeout_s is None:
        timeout_s = float(os.environ.get(protocol.ENV_GATE_TIMEOUT) or protocol.GATE_TIMEOUT_S)
    fd = int(fd)
    try:
        select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
        os.environ.pop(protocol.ENV_GATE_FD, None)


# ---- the rank's sockets (guard) -------------------------------------------------

def _lsof_finds(pid: int, port: int, state: str) -> bool:
    """macOS: does ``pid`` hold a TCP socket on ``port`` in ``state`` (lsof's -sTCP syntax, ^ excludes)?"""
    import subprocess  # the guard's side only (the rank's side of this module stays cheap to import)

    try:
        r = subprocess.run(["lsof", "-nP", "-a", "-p", str(pid), f"-iTCP:{port}", f"-sTCP:{state}", "-t"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and str(pid) in r.stdout.split()


def _linux_port_sockets(pid: int, port: int) -> dict[int, str]:
    """inode -> TCP state (hex, "0A" = LISTEN) of the sockets with local ``port`` in pid's network namespace."""
    suffix = f":{port:04X}"
    found: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[1].endswith(suffix):
                        found[int(parts[9])] = parts[3]
        except (OSError, ValueError):
            continue
    return found


def _linux_socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:[") and link.endswith("]"):
            inodes.add(int(link[8:-1]))
    return inodes


def _linux_own_states(pid: int, port: int) -> set[str]:
    """The states of the TCP sockets on local ``port`` that ``pid`` itself holds open."""
    candidates = _linux_port_sockets(pid, port)
    if not candidates:
        return set()
    mine = _linux_socket_inodes(pid)
    return {state for inode, state in candidates.items() if inode in mine}


def _netlink_listeners(port: int) -> set[int] | None:
    """Linux: inodes of the TCP sockets listening on ``port`` (this network namespace), via sock_diag.

    Why not ``/proc/net/tcp``: reading it walks every bucket of the kernel's
    connection hash, ~10 ms a read on a large-memory host; a LISTEN-only
    sock_diag dump walks the listening table only (~0.5 ms). None if the
    kernel refuses (then the caller reads ``/proc``).
    """
    import socket  # the guard's side only
    import struct

    found: set[int] = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as s:  # NETLINK_SOCK_DIAG
            s.settimeout(2.0)
            for family in (socket.AF_INET, socket.AF_INET6):
                # inet_diag_req_v2: family, protocol, ext, pad, states (1 << TCP_LISTEN), an empty sockid
                req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << 10) + bytes(48)
                # nlmsghdr: SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP
                s.sendto(struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0) + req, (0, 0))
                done = False
                while not done:
                    data = s.recv(65536)
                    off = 0
                    while off + 16 <= len(data):
                        length, kind = struct.unpack_from("=IH", data, off)
                        if kind == 3:  # NLMSG_DONE
                            done = True
                            break
                        if kind == 2 or length < 16:  # NLMSG_ERROR
                            return None
                        # inet_diag_msg after the header: sport (big endian) at 4, inode at 68
                        if struct.unpack_from(">H", data, off + 20)[0] == port:
                            found.add(struct.unpack_from("=I", data, off + 16 + 68)[0])
                        off += (length + 3) & ~3
                    if not data:
                        return None
    except (OSError, struct.error):
        return None
    return found


def _same_netns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def is_listening(pid: int, port: int) -> bool:
    """Whether the process ``pid`` itself has a socket listening on ``port``."""
    if _linux():
        listeners = _netlink_listeners(port) if _same_netns(pid) else None
        if listeners is None:  # a kernel without sock_diag, or the rank in another network namespace
            return "0A" in _linux_own_states(pid, port)
        return bool(listeners) and bool(listeners & _linux_socket_inodes(pid))
    return _lsof_finds(pid, port, "LISTEN")


def has_accepted(pid: int, port: int) -> bool:
    """Whether ``pid`` holds a connection on ``port`` that is not the listener: it got past accept()."""
    if _linux():
        return bool(_linux_own_states(pid, port) - {"0A"})
    return _lsof_finds(pid, port, "^LISTEN")


# ---- the guard's side -------------------------------------------------------------

class RankStart:
    """The guard's half of the ring start for its one rank.

    ``pipes`` (before the rank starts) makes the gate and init pipes and puts
    their descriptors in the rank's environment; ``configure`` (once the
    rank's configuration is known: a deferred guard learns it later) reads
    ``ENV_LISTEN``/``ENV_HOLD``/``ENV_HOLD_MAX_S``; then the guard's loop calls
    ``on_init``, ``release`` and ``tick``. ``is_stopped`` is the guard's
    process-state probe (the hold checks the rank is really frozen).
    """

    def __init__(self, is_stopped: Callable[[int], bool]):
        self.is_stopped = is_stopped
        self.gate_w: Optional[int] = None
        self.init_r: Optional[int] = None
        self.listen: Optional[str] = None
        self.port: Optional[int] = None
        self.hold_wanted = False
        self.hold_max = protocol.HOLD_MAX_S
        self.watch_next: Optional[float] = None  # set once the rank says it begins init
        self.watch_deadline = 0.0
        self.watch_step = WATCH_FIRST_S
        self.held_since: Optional[float] = None
        self.released = False

    def pipes(self, env: MutableMapping[str, str], deferred: bool) -> list[int]:
        """Before the rank starts: its gate (gated or deferred) and init pipe; the fds it must inherit."""
        child_fds = []
        if env.pop(protocol.ENV_GATED, None) == "1" or deferred:
            gate_r, self.gate_w = os.pipe()
            env[protocol.ENV_GATE_FD] = str(gate_r)
            child_fds.append(gate_r)
        if deferred or env.get(protocol.ENV_LISTEN):
            self.init_r, init_w = os.pipe()
            env[protocol.ENV_INIT_FD] = str(init_w)
            child_fds.append(init_w)
        env.pop(protocol.ENV_HOLD_MAX_S, None)
        return child_fds

    def configure(self, env: Mapping[str, str]) -> None:
        """The rank's ring address and whether it is held (a deferred guard knows only after its config line)."""
        self.listen = env.get(protocol.ENV_LISTEN)
        self.port = int(self.listen.rpartition(":")[2]) if self.listen else None
        self.hold_wanted = env.get(protocol.ENV_HOLD) == "1"
        self.hold_max = float(env.get(protocol.ENV_HOLD_MAX_S) or protocol.HOLD_MAX_S)

    def open_gate(self) -> None:
        """``go``: the gated rank may connect now (also a deferred rank that is not gated, at once)."""
        if self.gate_w is None:
            return
        try:
            os.write(self.gate_w, protocol.GATE_LINE)
        except OSError:
            pass
        os.close(self.gate_w)
        self.gate_w = None

    def on_init(self, got: bytes, now: float) -> None:
        """The init pipe answered: a byte starts the listening watch; end of file means never."""
        if got and self.port is not None:
            self.watch_next = now
            self.watch_deadline = now + WATCH_TOTAL_S

    def release(self, pid: int) -> None:
        """``release``: resume a held rank; no hold after this one (a late one would stall the ring)."""
        self.released = True
        if self.held_since is not None:
            os.kill(pid, signal.SIGCONT)
            self.held_since = None

    def hold(self, pid: int) -> bool:
        """SIGSTOP the rank inside accept(); False (and running again) where that is too late."""
        os.kill(pid, signal.SIGSTOP)
        end = time.monotonic() + STOPPED_WAIT_S
        while not self.is_stopped(pid) and time.monotonic() < end:
            time.sleep(0.001)
        # Frozen now, so this is a stable look: still listening, nothing accepted yet.
        if self.is_stopped(pid) and is_listening(pid, self.port) and not has_accepted(pid, self.port):
            return True
        os.kill(pid, signal.SIGCONT)
        return False

    def tick(self, now: float, pid: int, emit: Callable[..., None]) -> list[float]:
        """One turn of the guard's loop: end an overdue hold, look for the listener; the deadlines to wake at."""
        deadlines = []
        if self.held_since is not None:  # the hold is bounded
            if now >= self.held_since + self.hold_max:  # the release never came: let MLX's own retries take over
                os.kill(pid, signal.SIGCONT)
                self.held_since = None
            else:
                deadlines.append(self.held_since + self.hold_max)
        # The listening watch, from the init byte on, with back-off.
        if self.watch_next is not None and now >= self.watch_next:
            if is_listening(pid, self.port):
                if self.hold_wanted and not self.released and self.hold(pid):
                    self.held_since = time.monotonic()
                    deadlines.append(self.held_since + self.hold_max)
                emit("listening", address=self.listen)
                self.watch_next = None
            elif now >= self.watch_deadline:
                self.watch_next = None
            else:
                self.watch_next = now + self.watch_step
                self.watch_step = min(self.watch_step * 2, WATCH_MAX_STEP_S)
        if self.watch_next is not None:
            deadlines.append(self.watch_next)
        return deadlines
