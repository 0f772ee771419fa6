"""The ring start, controller side: which ranks wait, what they are handed, and when they are told.

Ring connection order matters for launch speed (the ring's addresses and the
Thunderbolt left-neighbour rule are in ``backends/ring.py``): ranks 0..N-2 bind
and accept first, rank N-1 *connects first* (to rank 0). If rank N-1 connects
before rank 0 listens, MLX sleeps a whole second before retrying. So rank N-1
is **gated**: it waits in ``mx.distributed.init`` for a ``go`` that is sent
once every other rank reports its socket is listening.

That leaves a second race: the moment rank N-1's connect succeeds, rank 0
accepts and the ring forms hop by hop (0 connects to 1, 1 to 2, ...) until
rank N-2 connects to rank N-1, which only now binds its own socket. With two
ranks (or a fast chain) the connect wins ~25% of the time on a busy machine
and costs another second. So rank 0 is also **held**: its guard SIGSTOPs it
as soon as it listens (it is blocked in accept(); the kernel still completes
rank N-1's handshake into the listen backlog), and it is released once rank
N-1 listens too. Then every connect in the chain finds a listener.

What it buys, measured (``benchmarks/launch_latency.py --runs 9``, 2 local
ranks, orch vs mlx.launch in the same run): see the README's launch table.

This module owns that policy: ``roles`` (who is gated and held, for the
plan), ``rank_env`` (what those ranks' guards are told), and ``RingStart``,
the per-attempt state the supervisor feeds with ``listening`` events and
exits, which answers with the control lines to send. The rank's half (the
gate, the init byte, the listening watch, the hold) is
``orchestrator/runtime/ringstart.py``. Only launchers whose ranks have a
private control channel (``launch.base.ControlChannel``: local and SSH) take
part; under mpirun there is no gate (no rank is gated for the mpi backend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from orchestrator import protocol

if TYPE_CHECKING:
    from orchestrator.backends.base import Backend
    from orchestrator.plan.model import JobPlan, RankPlan


def _backend(backend: "str | Backend") -> "Backend":
    from orchestrator import backends

    return backends.get(backend) if isinstance(backend, str) else backend


def roles(backend: "str | Backend", world_size: int) -> tuple[frozenset[int], frozenset[int]]:
    """(gated ranks, held ranks) of a job: on a ring of 2 or more, N-1 is gated and 0 held; else none."""
    if not _backend(backend).ring or world_size < 2:
        return frozenset(), frozenset()
    return frozenset({world_size - 1}), frozenset({0})


def rank_env(backend: "str | Backend", rank: "RankPlan") -> dict[str, str]:
    """The ring start's part of one rank's environment (read by its guard)."""
    env: dict[str, str] = {}
    if rank.gated:
        env[protocol.ENV_GATED] = "1"
    if rank.held:
        env[protocol.ENV_HOLD] = "1"
    if _backend(backend).ring and rank.listen:
        env[protocol.ENV_LISTEN] = rank.listen[0]
    return env


class RingStart:
    """One attempt's ring start: who still has to listen, and which lines that unlocks.

    Feed it every ``listening`` event (``listening``) and every rank exit
    (``gone``: a rank that is gone will never listen, and must not hold the
    others back); each returns ``[(rank, control line), ...]`` to send now,
    each line at most once. Order: ``release`` before ``go``, as the held rank
    must run on before the chain reaches it.
    """

    def __init__(self, gated: Iterable[int], held: Iterable[int], world_size: int):
        self.gated = frozenset(gated)
        self.held = frozenset(held)
        self.world_size = world_size
        self._settled: set[int] = set()  # ranks that listen, or never will (gone)
        self._gate_open = False
        self._released = False

    @classmethod
    def for_plan(cls, plan: "JobPlan") -> "RingStart":
        return cls((r.rank for r in plan.ranks if r.gated), (r.rank for r in plan.ranks if r.held), plan.world_size)

    def listening(self, rank: int) -> list[tuple[int, str]]:
        self._settled.add(rank)
        return self._lines()

    def gone(self, rank: int) -> list[tuple[int, str]]:
        self._settled.add(rank)
        return self._lines()

    def _lines(self) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        if not self.gated:
            return out
        if not self._released and self.gated <= self._settled:
            self._released = True  # the gated rank listens (or is gone): the held one may accept
            out += [(r, protocol.CONTROL_RELEASE) for r in sorted(self.held)]
        others = set(range(self.world_size)) - self.gated
        if not self._gate_open and others <= self._settled:
            self._gate_open = True  # every other rank listens: the gated one may connect
            out += [(r, protocol.CONTROL_GO) for r in sorted(self.gated)]
        return out
