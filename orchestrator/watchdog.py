"""The hang watchdogs, and what a hang diagnosis says about each rank.

Two watchdogs, one home:

* **step**: armed once a trainer starts; fires when no rank reported a step for
  ``--first-step-timeout`` (before the first) or ``--hang-timeout`` (after it),
  until every trainer finished. Once steps have come at a known pace it also fires
  sooner, on the **cadence** rule: no step for max(``--hang-floor``, ``CADENCE_K`` x the
  slowest interval between two steps of one rank seen so far). A deadlocked
  collective (MLX's ring spinning on every rank, ml-explore/mlx #4475) then costs
  ~30 s, not ``--hang-timeout``. Known long phases (a ``phase_start`` event until the
  rank's ``phase``, ``checkpoint``, ``metric`` or next ``step``: evaluation, checkpoint
  saves, mlx-lm's validation, ``report.phase``) pause the cadence rule, and an
  interval that spans one is not learned; ``--hang-timeout`` stays the ceiling;
* **idle**: for programs that report no steps (not ours, or not yet): fires
  when, for ``--hang-timeout``, no rank printed anything and no rank's CPU
  time advanced (the guard's ``rss`` samples carry it). A rank asleep, blocked
  on I/O or in a poll loop of a few wake-ups a second stays under the
  threshold. MLX's ring busy-waits inside a collective, so a rank stuck
  outside the ``all_sum`` its peers spin in is *not* caught by this rule (one
  idle rank alone was tried: it stopped legitimate programs, a rank loading a
  model silently while the others wait); ``report.step`` arms the step
  watchdog, which does catch it.

Before failing the run either way, every running rank's guard is asked for its
Python stacks (into the rank's stderr, so its log and tail), and the failure
names where each rank is. The supervisor owns the clock (its main loop sleeps
until the earliest deadline here); this module only keeps the evidence and
does the arithmetic.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from orchestrator import programs, protocol
from orchestrator.launch.base import ControlChannel
from orchestrator.records import RankPhase

STACK_WAIT_S = 1.5  # how long a hang diagnosis waits for the ranks' stack dumps
STACK_MARK = "orch: hang: stacks requested"
# A rank's CPU time "advanced" between two of its guard's samples when it grew by more than
# this share of one core (and at least IDLE_CPU_MIN_S).
IDLE_CPU_RATE = 0.02
IDLE_CPU_MIN_S = 0.02
# The guard samples every ~2 s: the idle watchdog fires only once every rank's CPU
# reading covers the whole window (a sample taken after it ended), waiting at most
# this long past the window for one (a guard too stuck to sample does not save a hang).
IDLE_SAMPLE_WAIT_S = 6.0
STOPPED_NOTE = "is stopped (SIGSTOP/SIGTSTP), not running"
# The cadence rule waits this many times the slowest step interval seen. Measured
# (benchmarks/step_jitter.py, 2-core box, with and without two busy processes competing):
# no interval of a real run (char_lm with evaluation and checkpoints, char_lm at 0.5-2.2 s
# a step, mlx-lm's rows) was more than 2.1x the slowest before it; 10 leaves a margin of
# ~5 for a machine that slows down mid-run. Steps faster than 3 s are under the floor anyway.
CADENCE_K = 10.0
# Events that end a rank's open phase (``phase_start``): the phase's own end, or what
# the runtime sends right after the work the phase named.
PHASE_ENDS = frozenset({"phase", "checkpoint", "metric", "step", "finished"})


class Watchdog:
    """The evidence both watchdogs time: last step, last sign of life, each rank's CPU samples."""

    def __init__(self, states: list, hang_timeout: float, first_step_timeout: float, idle: bool, launcher_name: str,
                 hang_floor: Optional[float] = None):
        self.states = states
        self.hang_timeout = hang_timeout
        self.hang_floor = hang_timeout if hang_floor is None else hang_floor  # None: the ceiling only
        self.first_step_timeout = first_step_timeout
        self.idle_enabled = idle
        self.launcher_name = launcher_name
        self.last_progress: Optional[float] = None  # a trainer started, or the last step of any rank
        self.any_step = False  # switches the step watchdog from the first-step to the hang timeout
        self.last_activity: Optional[float] = time.monotonic()  # output of any rank, or a rank's own event
        self.cpu_active: dict[int, float] = {}  # rank -> when its CPU time last advanced (or its first sample)
        # The cadence: each rank's last step, the intervals learned, the open phases.
        self.last_step_t: dict[int, float] = {}
        self.spanned_phase: set[int] = set()  # ranks whose current interval contains any rank's phase: not learned
        self.in_phase: dict[int, str] = {}  # rank -> the name of its open phase
        self.cadence_from: Optional[float] = None  # the last step, or the end of the last phase after it
        self.fastest: Optional[float] = None
        self.slowest: Optional[float] = None

    def _running(self) -> list:
        return [s for s in self.states if s.handle is not None and not s.exited.is_set()]

    # ---- evidence (each returns True when the supervisor's loop must recompute its deadline)
    def trainer_started(self) -> bool:
        if self.last_progress is None:
            self.last_progress = time.monotonic()
            return True
        return False

    def step(self, rank: Optional[int] = None, now: Optional[float] = None) -> bool:
        now = time.monotonic() if now is None else now
        self.last_progress = self.cadence_from = now
        first = not self.any_step
        self.any_step = True
        if rank is not None:
            prev = self.last_step_t.get(rank)
            if prev is not None and rank not in self.spanned_phase and now > prev:
                interval = now - prev
                self.fastest = interval if self.fastest is None else min(self.fastest, interval)
                grew = self.slowest is None or interval > self.slowest
                self.slowest = interval if self.slowest is None else max(self.slowest, interval)
                first = first or grew
            self.last_step_t[rank] = now
            self.spanned_phase.discard(rank)
            self.in_phase.pop(rank, None)
        return first

    def phase_start(self, rank: int, name: str) -> bool:
        """A rank began a known long phase: the cadence rule waits for its end."""
        self.in_phase[rank] = name
        # Every rank's current interval spans it: the others wait for this one in their next collective.
        self.spanned_phase.update(s.rank for s in self.states)
        return True

    def phase_end(self, rank: int, now: Optional[float] = None) -> bool:
        """The rank's open phase ended (its ``phase``, ``checkpoint`` or ``metric`` event): the cadence clock restarts."""
        if self.in_phase.pop(rank, None) is None:
            return False
        now = time.monotonic() if now is None else now
        if self.cadence_from is not None:
            self.cadence_from = max(self.cadence_from, now)
        return True

    def activity(self, now: Optional[float] = None) -> None:
        """A rank printed something: the idle watchdog starts over."""
        self.last_activity = time.monotonic() if now is None else now

    def cpu_sample(self, record) -> bool:
        """A rank's record just took a CPU sample (``rss`` event): did its CPU time advance?"""
        if record.cpu_t is None:
            return False
        now = record.cpu_t
        if record.prev_cpu_s is None:
            self.cpu_active[record.rank] = now  # idle is counted from a rank's first reading
            return True  # this first sample may arm the idle watchdog
        if record.cpu_s - record.prev_cpu_s > max(IDLE_CPU_MIN_S, IDLE_CPU_RATE * (now - record.prev_cpu_t)):
            self.cpu_active[record.rank] = now
            # Any rank's CPU progress still counts for all: firing on one idle rank while its peers spin
            # stopped legitimate programs (a rank loading silently while the others wait in a collective).
            self.activity(now)
        idle = self.idle_deadline()
        return idle is not None and now >= idle  # it may complete the idle watchdog's evidence

    # ---- deadlines
    def hang_deadline(self) -> Optional[float]:
        """When the step watchdog fires: armed once a trainer starts, until every trainer finished."""
        if self.last_progress is None:
            return None
        active = [s for s in self.states if s.record.phase == RankPhase.TRAINING and not s.exited.is_set()]
        if not active:
            return None
        ceiling = self.last_progress + (self.hang_timeout if self.any_step else self.first_step_timeout)
        cadence = self.cadence_deadline()
        return ceiling if cadence is None else min(ceiling, cadence)

    def cadence_limit(self) -> Optional[float]:
        """Seconds without a step the cadence rule allows: None until an interval is known."""
        if self.slowest is None or not self.any_step:
            return None
        return max(self.hang_floor, CADENCE_K * self.slowest)

    def cadence_deadline(self) -> Optional[float]:
        """When the cadence rule fires; None before it knows the pace, or while a running rank is in a phase."""
        limit = self.cadence_limit()
        if limit is None or self.cadence_from is None:
            return None
        running = {s.rank for s in self.states if not s.exited.is_set()}
        if any(r in running for r in self.in_phase):
            return None
        return self.cadence_from + limit

    def idle_deadline(self) -> Optional[float]:
        """When the idle watchdog fires: only while no rank has ever reported a step, and only once
        every running rank's guard has sent a CPU sample (without one, idle and busy look alike)."""
        if not self.idle_enabled or self.any_step or self.last_activity is None:
            return None
        running = self._running()
        if not running or any(s.record.cpu_s is None for s in running):
            return None
        quietest = min(self.cpu_active.get(s.record.rank, self.last_activity) for s in running)
        return max(self.last_activity, quietest) + self.hang_timeout

    def idle_wake(self) -> Optional[float]:
        """When the loop must look at the idle watchdog next (its window, then the sample wait)."""
        idle = self.idle_deadline()
        if idle is None:
            return None
        return idle if time.monotonic() < idle else idle + IDLE_SAMPLE_WAIT_S

    def idle_due(self, now: float) -> bool:
        """The idle window has passed and every running rank's CPU reading covers it (or waiting for one is over)."""
        idle = self.idle_deadline()
        if idle is None or now < idle:
            return False
        return now >= idle + IDLE_SAMPLE_WAIT_S or all(s.record.cpu_t is not None and s.record.cpu_t >= idle
                                                       for s in self._running())

    def quiet_ranks(self, states: list) -> list:
        """The ranks among ``states`` whose CPU time has not advanced for ``--hang-timeout``."""
        now = time.monotonic()
        return [s for s in states if self.cpu_active.get(s.record.rank, self.last_activity) + self.hang_timeout <= now]

    # ---- the diagnosis
    async def dump_stacks(self) -> None:
        """Ask every running rank's guard for its Python stacks (into its stderr, so its log and tail).

        Bounded: the dump is written by faulthandler from a signal handler, so a
        rank that is running at all answers within milliseconds, even one stuck
        in C code without the GIL. A stopped one (SIGSTOP) cannot: its guard
        answers a ``dump`` event saying so instead, and we do not wait for it.
        """
        running = self._running()
        for s in running:
            s.tail.append(STACK_MARK)  # the frames that follow in the tail are this dump's
            if isinstance(s.handle, ControlChannel):  # under mpirun no guard can be asked
                try:
                    s.handle.send_control(protocol.CONTROL_DUMP)
                except Exception:
                    pass
        await asyncio.sleep(STACK_WAIT_S if running else 0)

    def stopped_note(self, state) -> str:
        """What is known about a silent rank's process: its guard's word, else (local ranks) the OS's."""
        if state.record.stopped is not None:
            return STOPPED_NOTE if state.record.stopped else ""
        if not state.record.pid or self.launcher_name != "local":
            return ""
        try:
            import psutil

            st = psutil.Process(state.record.pid).status()
        except Exception:
            return ""
        return STOPPED_NOTE if st == psutil.STATUS_STOPPED else ""

    def hang(self, idle: bool = False) -> tuple[Optional[int], str]:
        """The failure a hang is: (the suspect rank or None, the reason naming where each rank is).

        ``idle``: the idle watchdog fired (no rank ever reported a step; no
        output and no CPU progress anywhere). Each rank gets one of: its top
        frames from the stack dump just requested, or "is stopped" when its
        guard found it stopped (a stopped process cannot dump its stack).
        """
        if idle or self.any_step:
            limit, option = self.hang_timeout, "--hang-timeout"
        else:
            limit, option = self.first_step_timeout, "--first-step-timeout"
        cadence = None if idle else self.cadence_deadline()
        by_cadence = (cadence is not None and self.last_progress is not None
                      and cadence < self.last_progress + limit)
        running = [s for s in self.states if not s.exited.is_set()]
        by_step: dict = {}
        for s in running:
            by_step.setdefault(s.record.steps, []).append(s)
        known = sorted((k for k in by_step if k is not None))
        parts = []
        suspect = None
        stopped = [s for s in running if self.stopped_note(s)]
        if idle:
            for st in stopped:
                parts.append(f"rank {st.rank} {self.stopped_note(st)}")
        else:
            order = ([None] if None in by_step else []) + known
            for k in order:
                group = by_step[k]
                ranks = ",".join(str(s.rank) for s in group)
                label = f"rank{'s' if len(group) > 1 else ''} {ranks}"
                if k is None:
                    parts.append(f"{label} never reported a step")
                else:
                    wall = group[0].record.last_step_wall
                    when = time.strftime("%H:%M:%S", time.localtime(wall)) if wall else "?"
                    parts.append(f"{label} last reported step {k} at {when}")
                for st in group:
                    note = self.stopped_note(st)
                    if note:
                        parts[-1] += f" (rank {st.rank} {note})"
        wheres = [(st, programs.top_frames(list(st.tail), STACK_MARK)) for st in running]
        if any(where for _, where in wheres):
            if stopped:
                parts.append("the running ranks' Python stacks are in their logs (logs/rank-N.log); "
                             "a stopped process cannot dump its stack")
            else:
                parts.append("every rank's Python stacks are in its log (logs/rank-N.log)")
        elif running and len(stopped) < len(running):
            parts.append("no rank answered with a Python stack (not a Python program, or stuck where it "
                         "cannot answer)")
        for st, where in wheres:
            if where:
                parts.append(f"rank {st.rank} is in {where}")
        # Programs whose progress only rank 0 prints (mlx-lm): ranks that never
        # report are not suspects for that alone.
        silent_by_design = None in by_step and bool(known)
        lowest = (by_step.get(None) if not silent_by_design else None) or (by_step[known[0]] if known else [])
        quiet = self.quiet_ranks(running) if idle else []
        spinning = 0 < len(quiet) < len(running)  # some ranks idle, the others busy: waiting in a collective
        if len(stopped) == 1:
            suspect = stopped[0]
        elif not idle and len(lowest) == 1 and len(running) > 1:
            suspect = lowest[0]
        elif spinning and len(quiet) == 1:
            suspect = quiet[0]
        if suspect is not None and len(running) > 1:
            parts.append(f"the others may be waiting for rank {suspect.rank}" if idle else
                         f"the others are likely blocked in a collective waiting for rank {suspect.rank}")
        if idle and spinning:
            names = ",".join(str(s.rank) for s in quiet)
            head = (f"hang: no rank printed anything for {limit:g}s ({option}) and rank{'s' if len(quiet) > 1 else ''} "
                    f"{names} used no CPU while the others kept busy (MLX's ring spins while it waits in a "
                    "collective), and no rank reports steps")
        elif idle:
            head = (f"hang: no rank printed anything or used CPU for {limit:g}s ({option}), "
                    "and no rank reports steps")
        elif by_cadence:
            quiet_for = time.monotonic() - self.last_progress
            head = (f"hang: no step for {quiet_for:.0f}s; steps came every {_pace(self.fastest, self.slowest)} "
                    f"(the watchdog waits {CADENCE_K:g}x the slowest, at least --hang-floor {self.hang_floor:g}s)")
        else:
            head = f"hang: no rank made progress for {limit:g}s ({option})"
        return (suspect.rank if suspect else None), head + (": " + "; ".join(parts) if parts else "")


def _pace(fastest: Optional[float], slowest: Optional[float]) -> str:
    """The range of step intervals for people: "1.2–2.0s", "12–340ms"."""
    if fastest is None or slowest is None:
        return "?"
    if slowest < 1:
        return f"{fastest * 1000:.0f}–{slowest * 1000:.0f}ms"
    fmt = (lambda v: f"{v:.1f}") if slowest < 10 else (lambda v: f"{v:.0f}")
    return f"{fmt(fastest)}–{fmt(slowest)}s"
