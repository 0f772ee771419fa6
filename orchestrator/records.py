"""What the events of a run say about each rank: one fold, used live and after the fact.

The supervisor applies every accepted event to a :class:`RankRecord` as it
arrives; ``orch report`` applies the events in ``events.jsonl`` to the same
records when a run left no summary.json; the live view reads the records. So
a rank's steps, loss, memory peaks, phases and shares mean the same in the
live block, in summary.json and in a report rebuilt from events, because they
are computed in one place (:meth:`RankRecord.apply`).

A rank's progress through its start is one monotonic :class:`RankPhase`
rather than a handful of booleans: a rank that reports a step has also
started training, one that trains was initialised, and no event moves a rank
back. Its exit is not a phase here: that is the launcher's word (an exit
status), which only the supervisor has.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Optional

from orchestrator.rundir import MemoryPlanSummary, MemorySummary, PhaseSummary, RankSummary, RebalanceSummary


class RankPhase(enum.IntEnum):
    """How far a rank got, as its own events say; only ever moves forward."""

    STARTED = 0    # launched; nothing said yet
    INIT = 1       # called mx.distributed.init (``init_start``)
    LISTENING = 2  # its ring socket listens (``listening``)
    READY = 3      # init returned (``ready``)
    TRAINING = 4   # a trainer started or a step was reported
    FINISHED = 5   # the trainer ended its loop (``finished``)


def _model(cls, e: dict, drop_none: bool = False):
    return cls.model_validate({k: e.get(k) for k in cls.model_fields if not (drop_none and e.get(k) is None)})


@dataclass
class RankRecord:
    """One rank's state as folded from its events (never from the launcher)."""

    rank: int
    host: str = "?"
    phase: RankPhase = RankPhase.STARTED
    pid: Optional[int] = None            # the rank's own pid, from its guard's ``spawned`` (once per attempt)
    pid_attempt: Optional[int] = None
    exit_code: Optional[int] = None      # the guard's ``exited`` event (the launcher's status wins when known)
    exit_signal: Optional[int] = None
    steps: Optional[int] = None
    total_steps: Optional[int] = None
    last_loss: Optional[float] = None
    nonfinite_loss_step: Optional[int] = None  # the first step whose loss was NaN or infinite
    samples_per_s: Optional[float] = None
    last_step_wall: Optional[float] = None  # the rank's wall clock at its last step
    memory: Optional[MemorySummary] = None
    phases: list = field(default_factory=list)  # PhaseSummary per ``report.phase(...)`` the rank ended
    batch_share: Optional[int] = None    # --balance speed: samples per micro-batch (rebalance events)
    memory_plan: Optional[MemoryPlanSummary] = None
    cpu_s: Optional[float] = None        # CPU seconds of its process tree, the guard's latest sample...
    cpu_t: Optional[float] = None        # ...and when it arrived (monotonic)
    prev_cpu_s: Optional[float] = None   # the sample before it (the idle watchdog compares the two)
    prev_cpu_t: Optional[float] = None
    stopped: Optional[bool] = None       # the guard's latest word: the process is stopped (SIGSTOP)

    def reached(self, phase: RankPhase) -> bool:
        return self.phase >= phase

    def _advance(self, phase: RankPhase) -> None:
        if phase > self.phase:
            self.phase = phase

    def apply(self, e: dict, trusted: bool = True) -> None:
        """Fold one event of this rank in. ``trusted``: a guard event carrying this attempt's token
        (only such a one may name the pid orch signals); events read back from a run directory are."""
        kind = e.get("kind")
        if kind == "spawned":
            pid = e.get("pid")
            # Never 0/1 (or a group-wide -1), and once per attempt.
            if trusted and type(pid) is int and pid > 1 and (self.pid is None or e.get("attempt") != self.pid_attempt):
                self.pid, self.pid_attempt = pid, e.get("attempt")
        elif kind == "exited":  # how the guard saw it end (SSH may not name a signal; the guard numbers it)
            if trusted:
                self.exit_code = e.get("code") if type(e.get("code")) is int else None
                self.exit_signal = e.get("signal") if type(e.get("signal")) is int else None
                if type(e.get("max_rss_bytes")) is int:  # the kernel's peak: what the 2 s samples can miss
                    m = self.memory or MemorySummary()
                    m.rss_peak_bytes = max(m.rss_peak_bytes, e["max_rss_bytes"])
                    self.memory = m
        elif kind == "init_start":
            self._advance(RankPhase.INIT)
        elif kind == "listening":
            self._advance(RankPhase.LISTENING)
        elif kind == "ready":
            self._advance(RankPhase.READY)
        elif kind == "train_start":
            self._advance(RankPhase.TRAINING)
        elif kind == "finished":
            self._advance(RankPhase.FINISHED)
        elif kind == "step":
            self._advance(RankPhase.TRAINING)
            self.last_step_wall = e.get("t")
            self.steps = e.get("step")
            self.total_steps = e.get("total_steps")
            self.last_loss = e.get("loss")
            if (self.nonfinite_loss_step is None and isinstance(self.last_loss, float)
                    and not math.isfinite(self.last_loss)):
                self.nonfinite_loss_step = e.get("step")
            self.samples_per_s = e.get("samples_per_s")
        elif kind == "memory":
            m = self.memory or MemorySummary()
            m.mlx_peak_bytes = max(m.mlx_peak_bytes, e.get("mlx_peak_bytes") or 0)
            m.mlx_active_bytes = e.get("mlx_active_bytes") or 0
            m.mlx_cache_bytes = e.get("mlx_cache_bytes") or 0
            m.rss_peak_bytes = max(m.rss_peak_bytes, e.get("rss_bytes") or 0)
            self._available(m, e.get("system_available_bytes"))
            m.metal_max_recommended_working_set_size = e.get("metal_max_recommended_working_set_size")
            self.memory = m
        elif kind == "rss":  # the guard's sampling: memory, CPU and run state for any program, ours or not
            cpu = e.get("cpu_s")
            if type(cpu) in (int, float):
                self.prev_cpu_s, self.prev_cpu_t = self.cpu_s, self.cpu_t
                self.cpu_s, self.cpu_t = float(cpu), time.monotonic()
            if type(e.get("stopped")) is bool:
                self.stopped = e["stopped"]
            m = self.memory or MemorySummary()
            m.rss_peak_bytes = max(m.rss_peak_bytes, e.get("rss_bytes") or 0)
            self._available(m, e.get("system_available_bytes"))
            self.memory = m
        elif kind == "dump":  # the guard's answer to a stack-dump request
            if type(e.get("stopped")) is bool:
                self.stopped = e["stopped"]
        elif kind == "phase":
            self.phases.append(_model(PhaseSummary, e))
        elif kind == "memory_plan":
            self.memory_plan = _model(MemoryPlanSummary, e)
        elif kind == "rebalance":  # every rank sends the same shares; each keeps its own
            shares = e.get("shares")
            if isinstance(shares, list):
                self.batch_share = shares[self.rank] if self.rank < len(shares) else None

    @staticmethod
    def _available(m: MemorySummary, avail) -> None:
        if avail is not None:
            m.system_available_min_bytes = avail if m.system_available_min_bytes is None else min(m.system_available_min_bytes, avail)

    def summary(self, exit_code: Optional[int] = None, signal: Optional[int] = None) -> RankSummary:
        """This rank's row of summary.json; ``exit_code``/``signal``: the launcher's status, when there is one."""
        return RankSummary(rank=self.rank, host=self.host, pid=self.pid, exit_code=exit_code, signal=signal,
                           steps=self.steps, last_loss=self.last_loss, samples_per_s=self.samples_per_s,
                           nonfinite_loss_step=self.nonfinite_loss_step,
                           memory=self.memory, phases=self.phases, batch_share=self.batch_share,
                           memory_plan=self.memory_plan)


@dataclass
class RunRecord:
    """The job-wide part of the fold: metrics (any rank) and the batch rebalances (rank 0's copy)."""

    metrics: dict = field(default_factory=dict)
    rebalances: list = field(default_factory=list)  # RebalanceSummary

    def apply(self, rank: int, e: dict) -> None:
        kind = e.get("kind")
        if kind == "metric" and isinstance(e.get("values"), dict):
            self.metrics.update(e["values"])
        elif kind == "rebalance" and rank == 0:
            self.rebalances.append(_model(RebalanceSummary, e, drop_none=True))


def fold(events: list[dict], hosts: dict[int, str]) -> tuple[dict[int, RankRecord], RunRecord]:
    """Every event read back from a run directory, applied in order (a run without summary.json)."""
    ranks = {r: RankRecord(rank=r, host=h) for r, h in hosts.items()}
    run = RunRecord()
    for e in events:
        r = e.get("from_rank", e.get("rank"))
        if not isinstance(r, int):
            continue
        rec = ranks.setdefault(r, RankRecord(rank=r))
        try:
            rec.apply(e)
            run.apply(r, e)
        except (ValueError, TypeError):  # a damaged event (hand-edited, old format) degrades, never stops, a report
            continue
    return ranks, run
