"""What the supervisor keeps while a job runs: the job's phase, each rank's state, the failure, its options.

``supervisor.py`` is the loop that moves them; these are the shapes, and the few numbers that
bound its waits.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from dataclasses import dataclass, field
from typing import Optional

from orchestrator import programs
from orchestrator.diagnose import Diagnosis, classify
from orchestrator.launch.base import ExitStatus, RankHandle, RankSpec
from orchestrator.plan import JobPlan
from orchestrator.records import RankPhase, RankRecord

TAIL_LINES = 200  # kept per rank (a stack dump fits) for diagnoses; the last SHOW_LINES are shown on failure
SHOW_LINES = 15
# How long to keep collecting rank exits after the first failure before naming
# the root cause: when one rank dies its ring neighbours fail within
# milliseconds ("connection to a peer was lost"), and asyncio may report theirs first.
SETTLE_S = 0.3
# When every rank that failed so far only reacted to another's failure (lost its
# peer, "other rank(s) failed"), wait up to this long after the first failure
# for the rank with the real error before naming a cause.
SECONDARY_WAIT_S = 3.0
PUMP_EOF_WAIT_S = 1.0  # after a rank exits, how long its output may still take to arrive
DRAIN_S = 2.0  # after every rank is stopped, how long the pumps may take to reach end of file
KILL_WAIT_S = 2.0  # after SIGKILL, how long to wait for the exits


class JobPhase(enum.Enum):
    STARTING = "starting"  # launching the ranks
    RUNNING = "running"    # every rank launched (or failed to): routing output, timing the watchdogs
    SETTLING = "settling"  # a rank failed: collecting the others' exits before naming the root cause
    STOPPING = "stopping"  # the outcome is known: stopping what still runs, draining its output
    DONE = "done"          # every rank has ended; the summary is written


_NEXT = {
    JobPhase.STARTING: {JobPhase.RUNNING, JobPhase.STOPPING},
    JobPhase.RUNNING: {JobPhase.SETTLING, JobPhase.STOPPING},
    JobPhase.SETTLING: {JobPhase.STOPPING},
    JobPhase.STOPPING: {JobPhase.DONE},
    JobPhase.DONE: set(),
}


@dataclass
class SupervisorOptions:
    init_timeout: float = 60.0
    stop_timeout: float = 3.0
    echo: bool = True
    handle_signals: bool = True
    live: Optional[bool] = None  # None: a live block when stderr is a terminal
    hang_timeout: float = 300.0  # no step from any rank for this long, once training started
    first_step_timeout: float = 120.0  # from a trainer's start to its first step
    hang_floor: float = 30.0  # the cadence rule never fires sooner than this after a step (watchdog.py)
    attempt: int = 0
    # --stdin: the controller's stdin (one relay for every attempt) and the ranks that read it.
    stdin_relay: Optional[object] = None
    stdin_ranks: tuple = ()
    # While no rank has reported a step: a hang is no output and no CPU progress on any rank
    # for hang_timeout. Off for runs where silence is expected (a rank waiting for typed input).
    idle_watchdog: bool = True
    # When the attempt began (time.monotonic(): connecting and staging count), for its duration; None: now.
    started: Optional[float] = None


@dataclass
class RankState:
    """One rank as the supervisor runs it: its handle and exit, its output tail, and its ``record``."""

    spec: RankSpec
    record: RankRecord = field(init=False)
    handle: Optional[RankHandle] = None
    status: Optional[ExitStatus] = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_t: Optional[float] = None
    pumps: list = field(default_factory=list)  # the output readers of this rank's streams
    # Progress read from the output of programs that are not ours (mlx-lm's report lines).
    program: programs.ProgramOutput = field(default_factory=programs.ProgramOutput)
    killed: bool = False  # orch had to SIGKILL it (the guard did not stop it in time)

    def __post_init__(self) -> None:
        self.record = RankRecord(rank=self.spec.rank, host=self.spec.host)

    def diagnosis(self, plan: Optional[JobPlan] = None) -> Optional[Diagnosis]:
        signal_ = self.status.signal if self.status else None
        # A rank that trained was initialised, even if no init hook reported it (a program that is not ours).
        initialised = self.record.reached(RankPhase.READY) or self.record.steps is not None
        return classify(self.tail, self.rank, plan, signal=signal_, initialised=initialised)

    @property
    def rank(self) -> int:
        return self.spec.rank


@dataclass
class Failure:
    rank: Optional[int]
    exit_code: int
    reason: str
