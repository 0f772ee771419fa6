"""The run loop: start every rank, route output and events, end the job well.

Shaped after torch elastic's agent (start, monitor, stop; failures are typed
results with a root cause) and horovod's runner (``[rank]`` prefixes; terminate
gracefully, then kill). Everything is asyncio: one reader task per output
stream and one waiter per rank, all in one task group (a failure anywhere
cancels the rest), and a main loop that sleeps on a single event until
something changes — the controller uses no CPU while ranks train.

The job moves through :class:`JobPhase` (STARTING → RUNNING → SETTLING →
STOPPING → DONE; one method, ``_enter``, refuses any other move). Each rank's
state as its events tell it is a :class:`records.RankRecord`; what only the
supervisor knows (its handle, exit status, output tail) is :class:`RankState`.
Neighbours: output.py (pumps, console, logs), watchdog.py (hangs and stack
dumps), ringstart.py (the gate and the hold), diagnose.py (causes).

Policy, in one place:

* the first rank to exit non-zero (or by a signal) is the root cause: every
  other rank is stopped (the guard sends SIGTERM to its process group and
  SIGKILL after the grace period) and ``orch`` exits with that rank's code;
* SIGINT / SIGTERM to ``orch`` stop every rank the same way (exit 130 / 143);
* once any rank calls ``mx.distributed.init``, all must be ready within
  ``init_timeout`` or the run fails naming the ranks that never joined;
* the rank that connects first waits at its gate until all others listen;
* a rank that only reacted to another's failure (lost its peer, stopped because
  another rank failed) is never named the cause over a rank with its own error;
* only the guard's events (``protocol.GUARD_KINDS``, carrying this attempt's
  token) are believed; anything else the rank prints is its output. A forged
  one is recorded as ``forged:<kind>`` and otherwise ignored;
* an output pump never dies before end of file: a closed console stops the
  echo, not the run; a log that cannot be written fails the run, naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import sys
import time
from typing import IO, Optional

from orchestrator import events as event_validation
from orchestrator import protocol
from orchestrator.aio import TaskGroup, signals_handled_by
from orchestrator.diagnose import Diagnosis
from orchestrator.launch.base import ControlChannel, ExitStatus, Launcher, RankSpec, signal_name
from orchestrator.live import LiveView
from orchestrator.output import Console, pump
from orchestrator.plan import JobPlan
from orchestrator.records import RankPhase, RunRecord
from orchestrator.plan.ringstart import RingStart
from orchestrator.stdin_forward import StdinForward
from orchestrator.rundir import RunDir, RunSummary
from orchestrator.supervisor_state import (DRAIN_S, KILL_WAIT_S, PUMP_EOF_WAIT_S, SECONDARY_WAIT_S, SETTLE_S,  # noqa: F401
                                           SHOW_LINES, _NEXT, Failure, JobPhase, RankState,
                                           SupervisorOptions)
from orchestrator.watchdog import PHASE_ENDS, Watchdog

class Supervisor:
    def __init__(
        self,
        plan: JobPlan,
        specs: list[RankSpec],
        launcher: Launcher,
        rundir: RunDir,
        script: str,
        options: Optional[SupervisorOptions] = None,
        out: IO[str] = sys.stdout,
        err: IO[str] = sys.stderr,
    ):
        self.plan = plan
        self.launcher = launcher
        self.rundir = rundir
        self.script = script
        self.opts = options or SupervisorOptions()
        self.echo = self.opts.echo
        self.out = out if isinstance(out, Console) else Console(out)
        self.err = err if isinstance(err, Console) else Console(err)
        self.states = [RankState(spec=s) for s in specs]
        self.run_record = RunRecord()  # metrics and rebalances
        self.ring_start = RingStart.for_plan(plan)  # the gate and the hold: which lines a listener or an exit unlocks
        self.watchdog = Watchdog(self.states, self.opts.hang_timeout, self.opts.first_step_timeout,
                                 self.opts.idle_watchdog, launcher.name, hang_floor=self.opts.hang_floor)
        self.phase = JobPhase.STARTING
        self.diagnosis: Optional[Diagnosis] = None
        self.failure: Optional[Failure] = None
        self.interrupted: Optional[int] = None
        self.init_deadline: Optional[float] = None
        self._wake = asyncio.Event()
        self._kill_now = asyncio.Event()  # a second Ctrl-C: no grace
        self._diverged_said = False  # a NaN/inf loss was pointed out
        self.stdin = (StdinForward(self.opts.stdin_relay, [s for s in self.states if s.rank in self.opts.stdin_ranks])
                      if self.opts.stdin_relay is not None and self.opts.stdin_ranks else None)  # --stdin
        self._failed: list[RankState] = []  # ranks that failed on their own, in exit order (SETTLING)
        self._first_failure_t: Optional[float] = None
        self._settle_deadline: Optional[float] = None
        self._unwritable: set = set()  # log/event files that failed to write (reported once each)
        self.live = LiveView(self.states, err=self.err, tty=self.opts.live)

    def _enter(self, phase: JobPhase) -> None:
        """The job's one way forward; a move the table does not allow is a bug, said loudly."""
        if phase not in _NEXT[self.phase]:
            raise RuntimeError(f"supervisor: {self.phase.value} -> {phase.value} is not a legal move")
        self.phase = phase

    # ---- the run -------------------------------------------------------
    async def run(self) -> RunSummary:
        t0 = self.opts.started if self.opts.started is not None else time.monotonic()
        started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - t0)))
        self.watchdog.activity()
        self._build_models()
        with signals_handled_by(self._interrupt) if self.opts.handle_signals else contextlib.nullcontext():
            async with TaskGroup() as ranks:  # every pump and exit watcher of this attempt
                try:
                    await self._start_all(ranks)
                    self._enter(JobPhase.RUNNING)
                    async with TaskGroup() as aside:
                        if self.stdin is not None:  # cancelled when the monitor returns
                            aside.create_task(self.stdin.run())
                        await self._monitor()
                        aside.cancel()
                finally:
                    if self.phase is not JobPhase.STOPPING:
                        self._enter(JobPhase.STOPPING)
                    await self._stop_all()
                    await ranks.drain(DRAIN_S)  # the launcher is its owner's to collect from and close (job.py)
        self._enter(JobPhase.DONE)
        summary = self._summary(time.monotonic() - t0, started_at)
        self._report(summary)
        return summary

    @staticmethod
    def _build_models() -> None:
        """Build the event validator and the summary's model (pydantic builds them on first use, ~15 ms)
        now: pre-started ranks already have their configuration and are starting, so this overlaps
        them, instead of delaying the first event's answer (the ring's gate) and the end of the run."""
        event_validation.prepare()
        RunSummary.model_rebuild()

    def _interrupt(self, sig: int) -> None:
        """The first signal stops every rank in order (SIGTERM, --grace, SIGKILL); a second one does not wait."""
        if self.interrupted is None:
            self.interrupted = sig
            self.err.write(f"\norch: {signal_name(sig)} received; stopping all ranks (again to kill them now)\n")
        elif not self._kill_now.is_set():
            self._kill_now.set()
            self.err.write(f"orch: {signal_name(sig)} again; killing every rank now\n")
        self._wake.set()

    async def _start_all(self, ranks: TaskGroup) -> None:
        async def start(state: RankState) -> None:
            try:
                state.handle = await self.launcher.start(state.spec)
            except Exception as e:  # a launcher error is a run failure, reported once
                state.status = ExitStatus(code=127, signal=None)
                state.exited.set()
                self._fail(state.rank, 127, f"could not start rank {state.rank} on {state.spec.host}: {e}")
                return
            state.pumps = [ranks.create_task(pump(self, state, state.handle.stdout, self.out)),
                           ranks.create_task(pump(self, state, state.handle.stderr, self.err))]
            ranks.create_task(self._watch(state))

        await asyncio.gather(*(start(s) for s in self.states))

    async def _monitor(self) -> None:
        """Sleep until something changes or a deadline passes; return once the outcome is known."""
        wd = self.watchdog
        while True:
            all_exited = all(s.exited.is_set() for s in self.states)
            if self._failed and self.failure is None:
                now = time.monotonic()
                if self.phase is JobPhase.RUNNING:
                    self._enter(JobPhase.SETTLING)
                    self._first_failure_t, self._settle_deadline = now, now + SETTLE_S
                if not all_exited and now >= self._settle_deadline and self._only_secondary():
                    # Everyone who failed only reacted to another rank: give that rank time to fail too.
                    self._settle_deadline = max(self._settle_deadline, self._first_failure_t + SECONDARY_WAIT_S)
                if all_exited or time.monotonic() >= self._settle_deadline:
                    self._name_root_cause()
            if self.failure or self.interrupted or all_exited:
                self._enter(JobPhase.STOPPING)
                return
            deadlines = [self._settle_deadline] if self.phase is JobPhase.SETTLING else []
            if self.init_deadline is not None and not all(s.record.reached(RankPhase.READY) or s.exited.is_set()
                                                          for s in self.states):
                deadlines.append(self.init_deadline)
            deadlines += [d for d in (wd.hang_deadline(), wd.idle_wake()) if d is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                now = time.monotonic()
                if self.init_deadline is not None and now >= self.init_deadline:
                    self._init_timed_out()
                hang = wd.hang_deadline()
                if self.failure is None and hang is not None and now >= hang:
                    await self._hung(idle=False)
            self._wake.clear()
            if self.failure is None and self.interrupted is None and wd.idle_due(time.monotonic()):
                await self._hung(idle=True)

    async def _hung(self, idle: bool) -> None:
        """A watchdog fired: ask for the stacks, then fail naming where each rank is.

        The stacks go to the rank logs and the diagnosis quotes their top frames; on the console
        they were a dozen lines per rank above the one line that says what happened."""
        echo, self.echo = self.echo, False
        try:
            await self.watchdog.dump_stacks()
        finally:
            self.echo = echo
        rank, reason = self.watchdog.hang(idle=idle)
        self._fail(rank, 1, reason)

    def _init_timed_out(self) -> None:
        waiting = [s for s in self.states if not s.record.reached(RankPhase.READY) and not s.exited.is_set()]
        if not waiting:
            return
        names = ", ".join(f"{s.rank} ({s.spec.host}{', never called init' if not s.record.reached(RankPhase.INIT) else ''})"
                          for s in waiting)
        listens = "; ".join(f"rank {s.rank} listens on {','.join(self.plan.ranks[s.rank].listen)}" for s in waiting if self.plan.ranks[s.rank].listen)
        self._fail(
            waiting[0].rank,
            1,
            f"ranks never became ready within --init-timeout {self.opts.init_timeout:g}s: {names}"
            + (f". Check that each address is reachable from the previous rank: {listens}" if listens else ""),
        )

    def _fail(self, rank: Optional[int], code: int, reason: str) -> None:
        if self.failure is None and self.interrupted is None:
            self.failure = Failure(rank=rank, exit_code=code, reason=reason)
        self._wake.set()

    async def _watch(self, state: RankState) -> None:
        status = await state.handle.wait()
        state.status = status
        state.exit_t = time.monotonic()
        # Let the output readers reach the end so the tail (used to tell cause from casualty)
        # is complete; bounded, since a daemon the rank left may hold its pipes open.
        if state.pumps:
            await asyncio.wait(state.pumps, timeout=PUMP_EOF_WAIT_S)
        await asyncio.sleep(0)
        state.exited.set()
        if not status.ok and self.failure is None and self.interrupted is None:
            self._failed.append(state)
        self._send_ring_lines(self.ring_start.gone(state.spec.rank))
        self._wake.set()

    async def _stop_all(self) -> None:
        """SIGTERM (through each guard) to every rank still running; SIGKILL after ``stop_timeout``."""
        running = [s for s in self.states if s.handle is not None and not s.exited.is_set()]
        if not running:
            return
        for s in running:
            s.handle.stop()
        all_exited = asyncio.ensure_future(asyncio.gather(*(s.exited.wait() for s in running)))
        kill_now = asyncio.ensure_future(self._kill_now.wait())
        try:
            await asyncio.wait({all_exited, kill_now}, timeout=self.opts.stop_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (all_exited, kill_now):
                f.cancel()
        left = [s for s in running if not s.exited.is_set()]
        if not left:
            return
        for s in left:
            s.killed = True
            s.handle.kill()
        try:
            await asyncio.wait_for(asyncio.gather(*(s.exited.wait() for s in left)), KILL_WAIT_S)
        except asyncio.TimeoutError:
            pass

    # ---- output and events (output.py calls these) ----------------------
    def note(self, text: str) -> None:
        try:
            self.err.write(text)
            self.err.flush()
        except Exception:
            pass

    def activity(self) -> None:
        self.watchdog.activity()

    def write_failed(self, path, exc: BaseException) -> None:
        """A log or events file cannot be written (disk full...): fail the run, once, naming the file."""
        if str(path) in self._unwritable:
            return
        self._unwritable.add(str(path))
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        self._fail(None, 1, f"cannot write {path}: {why}; the run was stopped (free space there and rerun, or pass --run-dir)")

    def _record(self, payload: dict) -> None:
        try:
            self.rundir.event(payload)
        except Exception as e:  # disk full: the run fails naming the file; the output keeps flowing
            self.write_failed(self.rundir.events_path, e)

    def _guard_event_ok(self, state: RankState, payload: dict) -> Optional[bool]:
        """For an event of a kind only the guard may send: strip its token and say what it is.

        True: it carries this attempt's token (it is the guard's). False: no token
        is expected (mpirun), so it may inform but never name a pid to signal.
        None: forged (a token was expected and this is not it).
        """
        token = payload.pop(protocol.TOKEN_FIELD, None)
        expected = state.handle.token if state.handle is not None else None
        if expected is None:
            return False
        if isinstance(token, str) and hmac.compare_digest(token.encode(), expected.encode()):
            return True
        return None

    def on_rank_event(self, state: RankState, payload: dict) -> None:
        """One event line from a rank: authenticate, record, fold into its record, act on what it changes."""
        payload = dict(payload)
        kind = payload.get("kind")
        trusted = False
        if kind not in protocol.GUARD_KINDS:
            payload.pop(protocol.TOKEN_FIELD, None)  # a token is never logged, whoever sent it
        else:
            verdict = self._guard_event_ok(state, payload)
            if verdict is None:
                self._record({**payload, "kind": f"forged:{kind}", "recv_t": time.time(), "from_rank": state.rank,
                              "attempt": self.opts.attempt})
                return
            trusted = verdict
        payload = {**payload, "recv_t": time.time(), "from_rank": state.rank, "attempt": self.opts.attempt}
        if event_validation.validate({k: v for k, v in payload.items() if k not in ("recv_t", "from_rank", "attempt")}) is None:
            payload["kind"] = f"unknown:{payload.get('kind')}"
            self._record(payload)
            return
        if kind == "stdin_read":  # --stdin flow control (not logged: one per line typed, or per 256 KiB piped)
            if self.stdin is not None:
                self.stdin.read(state.rank, payload["bytes"], payload["closed"])
            return
        self._record(payload)
        rec, wd = state.record, self.watchdog
        rec.apply(payload, trusted=trusted)
        self.run_record.apply(state.rank, payload)
        if kind not in ("rss", "dump"):  # a rank's own event is a sign of life; the guard's samples are not
            wd.activity()
        wake = kind in ("ready", "finished")
        if kind == "spawned" and trusted and rec.pid is not None:
            state.handle.rank_pid = rec.pid  # the guard's own word, once per attempt, never 0/1
        elif kind == "init_start" and self.init_deadline is None:
            self.init_deadline = time.monotonic() + self.opts.init_timeout
            wake = True
        elif kind == "listening":
            self._send_ring_lines(self.ring_start.listening(state.spec.rank))
        elif kind == "train_start":
            wake = wd.trainer_started()
        elif kind == "step":
            wake = wd.step(state.rank)
            if rec.nonfinite_loss_step is not None and not self._diverged_said:
                self._diverged_said = True  # once per attempt: every rank of an all-reduced loss says the same
                with self.live.around_output():  # above the live block, which would otherwise redraw over it
                    self.note(f"orch: rank {state.rank} reported loss {payload.get('loss')} at step "
                              f"{rec.nonfinite_loss_step}: training diverged (the run goes on; Ctrl-C stops it)\n")
        elif kind == "phase_start":
            wake = wd.phase_start(state.rank, str(payload.get("name")))
        elif kind == "rss" and type(payload.get("cpu_s")) in (int, float):
            wake = wd.cpu_sample(rec)
        if kind in PHASE_ENDS and kind != "step":
            wake = wd.phase_end(state.rank) or wake
        if wake:
            self._wake.set()
        self.live.on_event(state, payload)

    def _send_ring_lines(self, lines: list[tuple[int, str]]) -> None:
        """The ring start's ``release``/``go`` (orchestrator/ringstart.py), to ranks still running."""
        by_rank = {s.spec.rank: s for s in self.states}
        for rank, line in lines:
            s = by_rank.get(rank)
            if s is not None and isinstance(s.handle, ControlChannel) and not s.exited.is_set():
                s.handle.send_control(line)

    # ---- the root cause --------------------------------------------------
    def _secondary(self, state: RankState) -> bool:
        d = state.diagnosis(self.plan)
        return d is not None and d.secondary

    def _only_secondary(self) -> bool:
        return bool(self._failed) and all(self._secondary(s) for s in self._failed)

    def _name_root_cause(self) -> None:
        """The first failed rank with an error of its own; a rank that only lost its peer
        (or stopped because another failed) is named only when no rank has a real error,
        whatever order they exited in."""
        primary = [s for s in self._failed if not self._secondary(s)] or self._failed
        root = min(primary, key=lambda s: s.exit_t or 0.0)
        st = root.status
        how = ("was " + st.how) if st.signal is not None or st.signal_label else st.how
        if st.signal_label and root.record.exit_signal is not None:  # SSH could not name it; the guard numbered it
            how += f" (signal {root.record.exit_signal} on {root.spec.host})"
        if st.reason:
            how += f": {st.reason}"
        others = [s.rank for s in self._failed if s is not root]
        note = f" (then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too)" if others else ""
        self._fail(root.rank, st.shell_code, f"rank {root.rank} ({root.spec.host}) {how}{note}")
        self.diagnosis = root.diagnosis(self.plan)

    # ---- the end ---------------------------------------------------------
    def _summary(self, duration: float, started_at: str) -> RunSummary:
        if self.interrupted is not None:
            status, code = "interrupted", 128 + self.interrupted
        elif self.failure is not None:
            status, code = "failed", self.failure.exit_code
        else:
            status, code = "succeeded", 0
        failed = self.failure is not None and status == "failed"
        diagnosed = self.diagnosis is not None and status == "failed"
        return RunSummary(
            status=status,
            exit_code=code,
            failed_rank=self.failure.rank if failed else None,
            reason=self.failure.reason if failed else None,
            diagnosis=self.diagnosis.message if diagnosed else None,
            diagnosis_cause=self.diagnosis.cause if diagnosed else None,
            warnings=self._warnings(),
            duration_s=round(duration, 3),
            started_at=started_at,
            script=self.script,
            backend=self.plan.backend,
            world_size=self.plan.world_size,
            run_dir=str(self.rundir.path),
            ranks=[s.record.summary(exit_code=s.status.code if s.status else None,
                                    signal=s.status.signal if s.status else None) for s in self.states],
            metrics=self.run_record.metrics,
            rebalances=self.run_record.rebalances,
        )

    def _warnings(self) -> list[str]:
        """What a person must know after the run: a loss that stopped being finite, and JACCL ranks SIGKILLed."""
        diverged = [s.record for s in self.states if s.record.nonfinite_loss_step is not None]
        out = [f"the loss of rank {r.rank} was NaN or infinite from step {r.nonfinite_loss_step} on: the run diverged"
               for r in diverged[:1]]
        if len(diverged) > 1:
            out[0] += f" (and that of {len(diverged) - 1} more rank{'s' if len(diverged) > 2 else ''})"
        return out + self._kill_warnings()

    def _kill_warnings(self) -> list[str]:
        """JACCL ranks that had to be SIGKILLed.

        JACCL survivors of a dead peer can spin and ignore SIGTERM (MLX #3910,
        #4278), so the grace-then-SIGKILL path is their normal end, and a
        SIGKILLed process can leave its RDMA-registered memory wired until reboot.
        """
        from orchestrator import backends

        warning = backends.get(self.plan.backend).kill_warning()
        if warning is None:
            return []
        killed = [s for s in self.states if s.killed or (s.status is not None and s.status.signal == signal.SIGKILL)]
        if not killed:
            return []
        where = ", ".join(f"rank {s.rank} on {s.spec.host}" for s in killed)
        return [f"{warning} ({where})"]

    def _report(self, summary: RunSummary) -> None:
        rank = summary.failed_rank
        tail = list(self.states[rank].tail)[-SHOW_LINES:] if summary.status == "failed" and rank is not None else []
        self.live.end(summary, tail)
