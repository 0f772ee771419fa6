"""Wait for the slowest rank asleep, not spinning: a barrier of the ranks that share a machine.

MLX's ring busy-waits: a rank that reaches the all-reduce first burns a whole
core until the last rank arrives (measured: 3.0 s of CPU in a 3.0 s wait).
When ranks share a machine (``orch run -n N``, or several ranks per host),
those spinning cores are taken from the ranks of the same machine that are
still computing, so the slowest rank gets slower exactly because the others
wait for it. With the quiet wait each rank evaluates its gradients, then
blocks in ``recv`` (the kernel parks the thread) until every rank *of its
machine* has arrived, and only then enters the collective. A rank alone on
its machine has nobody to slow down and skips it (``QuietBarrier.active``).

Per machine, the barrier is a star on its lowest rank (the leader) over
loopback TCP: every other rank sends one byte and blocks; the leader reads
one byte from each, then answers each. Machines are told apart by the
hostfile name the controller gives each rank (``ORCH_HOST``; hostnames
repeat across network namespaces and containers). Rendezvous costs one
``all_sum`` of ``[machine, port, nonce]`` per rank at start, so the controller
plans no port, and a second one agrees that every rank connected: if any
did not, every rank turns the quiet wait off (the run goes on, as without it).
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time
import zlib
from typing import Optional

import mlx.core as mx
import numpy as np

from orchestrator import protocol

CONNECT_TIMEOUT_S = 20.0  # the leader listens before the rendezvous all_sum, so this only bounds a broken host


def wanted(mode: str, world: int, env: Optional[dict] = None) -> bool:
    """Whether to build the barrier (``--quiet-wait``): ``on``; ``off`` (the default); ``auto``: under
    ``orch run`` (``ORCH_HOST`` is set on every rank of it, or on none), except under MPI.

    Every rank must decide the same, since building it is collective; so the
    decision never looks at how many ranks *this* machine runs
    (``LOCAL_WORLD_SIZE`` differs between hosts): the barrier itself goes
    idle on a rank alone on its machine. Under mpirun every rank gets rank
    0's environment, ``ORCH_HOST`` included, so machines cannot be told apart:
    ``auto`` stays off there, and ``on`` takes all ranks for one machine, which
    on several hosts fails the rendezvous (after ``CONNECT_TIMEOUT_S``) and
    turns the wait off.
    """
    env = os.environ if env is None else env
    if world < 2 or mode == "off":
        return False
    return mode == "on" or (bool(env.get(protocol.ENV_HOST)) and env.get(protocol.ENV_BACKEND) != "mpi")


class QuietBarrier:
    """``barrier.wait()`` returns once every rank of this machine has called it; waiting ranks sleep.

    Collective to build (every rank of ``group`` must construct it, in the same
    order relative to other collectives); ``wait()`` is a no-op where
    ``active`` is False (a rank alone on its machine, or a rendezvous that
    failed somewhere).
    """

    def __init__(self, group: mx.distributed.Group, host: Optional[str] = None) -> None:
        self.rank, self.world = group.rank(), group.size()
        host = host if host is not None else os.environ.get(protocol.ENV_HOST, "") or socket.gethostname()
        self._peers: list[socket.socket] = []
        self.leader = True
        self.waited_s, self.waits = 0.0, 0  # time this rank spent waiting for its machine's slowest rank
        self.machine_ranks = 0  # ranks of the group on this machine, this one included (0: not known)
        server: Optional[socket.socket] = None
        ok, port = 1, 0
        try:  # nothing here may raise past the all_sum below: the other ranks would wait in it forever
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.bind(("127.0.0.1", 0))
            server.listen(self.world)
            port = server.getsockname()[1]
        except OSError:
            ok = 0
        try:
            # Per rank: its machine, its port, and a nonce its leader's peers must send back (so a stray
            # connection to the port is never taken for a rank).
            mine = np.zeros((self.world, 3), dtype=np.int32)
            mine[self.rank] = (zlib.crc32(host.encode()) & 0x7FFFFFFF, port, secrets.randbits(31))
            table = mx.distributed.all_sum(mx.array(mine), group=group).tolist()
            same = [r for r, row in enumerate(table) if row[0] == table[self.rank][0]]
            lead = same[0]
            self.leader = lead == self.rank
            self.machine_ranks = len(same)
            if ok:
                try:
                    if self.leader:
                        self._accept(server, table[lead][2], set(same[1:]))
                    else:
                        conn = socket.create_connection(("127.0.0.1", table[lead][1]), timeout=CONNECT_TIMEOUT_S)
                        self._peers.append(_tune(conn))
                        conn.sendall(struct.pack("!ii", table[lead][2], self.rank))
                except OSError:
                    ok = 0
        finally:
            if server is not None:
                server.close()
        agreed = int(mx.distributed.all_sum(mx.array(ok, dtype=mx.int32), group=group).item())
        self.failed = agreed != self.world
        if self.failed:
            self.close()

    def _accept(self, server: socket.socket, nonce: int, expected: set[int]) -> None:
        """Take one connection from each rank in ``expected``, each proving itself with the nonce."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while expected:
            server.settimeout(max(0.01, deadline - time.monotonic()))
            conn, _ = server.accept()  # socket.timeout (an OSError) past the deadline
            try:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                hello = _recv_exact(conn, 8)
                got, rank = struct.unpack("!ii", hello) if hello else (None, None)
            except OSError:
                got, rank = None, None
            if got != nonce or rank not in expected:
                conn.close()  # not one of ours
                continue
            expected.discard(rank)
            self._peers.append(_tune(conn))

    @property
    def active(self) -> bool:
        return bool(self._peers)

    def wait(self) -> None:
        if not self._peers:
            return
        started = time.perf_counter()
        if self.leader:
            for p in self._peers:
                _recv1(p)
            for p in self._peers:
                p.sendall(b"g")
        else:
            self._peers[0].sendall(b"r")
            _recv1(self._peers[0])
        self.waited_s += time.perf_counter() - started
        self.waits += 1

    def metrics(self) -> dict:
        """For the end-of-run metrics: how many ranks this machine runs as the barrier saw it (0 where the
        rendezvous failed and the wait is off), and the mean time a step waited for the slowest of them."""
        out = {"quiet_wait_machine_ranks": 0 if self.failed else self.machine_ranks}
        if self.waits:
            out["quiet_wait_ms_per_step"] = round(1000 * self.waited_s / self.waits, 3)
        return out

    def close(self) -> None:
        for p in self._peers:
            p.close()
        self._peers = []


def _tune(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(None)  # a step may take hours; the controller's watchdog bounds a hang
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = s.recv(n - len(data))
        if not more:
            return b""
        data += more
    return data


def _recv1(s: socket.socket) -> None:
    if not s.recv(1):
        raise ConnectionError("quiet wait: a rank of this machine left the barrier (its process ended)")
