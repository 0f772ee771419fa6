"""The run loop: start every rank, route output and events, end the job well.

Shaped after torch elastic's agent (start, monitor, stop; failures are typed
results with a root cause) and horovod's runner (``[rank]`` prefixes; terminate
gracefully, then kill). Everything is asyncio: one reader task per output
stream, one waiter per rank, and a main loop that sleeps on a single event
until something changes — the controller uses no CPU while ranks train.

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
import collections
import hmac
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Callable, Optional

from orchestrator import events as event_validation
from orchestrator import programs, protocol
from orchestrator.diagnose import Diagnosis, classify
from orchestrator.launch.base import (READ_CHUNK, ControlChannel, ExitStatus, Launcher, LineSplitter, RankHandle, RankSpec,
                                      signal_name)
from orchestrator.live import LiveView
from orchestrator.plan import JobPlan
from orchestrator.ringstart import RingStart
from orchestrator.rundir import (
    MemoryPlanSummary, MemorySummary, PhaseSummary, RankSummary, RebalanceSummary, RunDir, RunSummary,
)
from orchestrator.units import human_bytes

TAIL_LINES = 200  # kept per rank (a stack dump fits) for diagnoses; the last SHOW_LINES are shown on failure
SHOW_LINES = 15
STACK_WAIT_S = 1.5  # how long a hang diagnosis waits for the ranks' stack dumps
STACK_MARK = "orch: hang: stacks requested"
# How long to keep collecting rank exits after the first failure before naming
# the root cause: when one rank dies its ring neighbours fail within
# milliseconds ("connection to a peer was lost"), and asyncio may report theirs first.
SETTLE_S = 0.3
# When every rank that failed so far only reacted to another's failure (lost its
# peer, "other rank(s) failed"), wait up to this long after the first failure
# for the rank with the real error before naming a cause.
SECONDARY_WAIT_S = 3.0
CONSOLE_LINE_MAX = 16 * 1024  # bytes of one output line shown on the console; the log keeps all
PUMP_EOF_WAIT_S = 1.0  # after a rank exits, how long its output may still take to arrive
# The idle-hang watchdog (programs that report no steps): a rank's CPU time "advanced"
# between two of its guard's samples when it grew by more than this share of one core
# (and at least IDLE_CPU_MIN_S). A rank blocked in a collective or a sleep uses ~0; a
# poll loop of a few wake-ups a second stays under it.
IDLE_CPU_RATE = 0.02
IDLE_CPU_MIN_S = 0.02
# The guard samples every ~2 s: the idle watchdog fires only once every rank's CPU
# reading covers the whole window (a sample taken after it ended), waiting at most
# this long past the window for one (a guard too stuck to sample does not save a hang).
IDLE_SAMPLE_WAIT_S = 6.0
STOPPED_NOTE = "is stopped (SIGSTOP/SIGTSTP), not running"


class Console:
    """A console stream that outlives its reader.

    ``orch run ... | head -3`` closes our stdout: a write then raises
    BrokenPipeError. From then on this stream is quiet (the ranks' output
    is still logged and the run ends normally), and the file descriptor is
    pointed at /dev/null so Python's own flush at exit cannot print a
    traceback either. Any other write error (a full disk behind a redirect,
    a closed terminal) is treated the same way: the console is a view, the
    logs are the record.
    """

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(text)
        except (OSError, ValueError):
            self._broke()

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self._broke()

    def isatty(self) -> bool:
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError, AttributeError):
            return False

    def _broke(self) -> None:
        self.broken = True
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, AttributeError):
            return  # not a real file (a StringIO): nothing will flush it at exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, fd)
            finally:
                os.close(devnull)
        except OSError:
            pass


@dataclass
class SupervisorOptions:
    init_timeout: float = 60.0
    stop_timeout: float = 3.0
    echo: bool = True
    handle_signals: bool = True
    live: Optional[bool] = None  # None: a live block when stderr is a terminal
    hang_timeout: float = 300.0  # no step from any rank for this long, once training started
    first_step_timeout: float = 120.0  # from a trainer's start to its first step
    attempt: int = 0
    # --stdin: the controller's stdin (one relay for every attempt) and the ranks that read it.
    stdin_relay: Optional[object] = None
    stdin_ranks: tuple = ()
    # While no rank has reported a step: a hang is no output and no CPU progress on any rank
    # for hang_timeout. Off for runs where silence is expected (a rank waiting for typed input).
    idle_watchdog: bool = True


@dataclass
class RankState:
    spec: RankSpec
    handle: Optional[RankHandle] = None
    pid: Optional[int] = None
    status: Optional[ExitStatus] = None
    init_started: bool = False
    listening: bool = False
    ready: bool = False
    steps: Optional[int] = None
    total_steps: Optional[int] = None
    last_loss: Optional[float] = None
    samples_per_s: Optional[float] = None
    memory: Optional[MemorySummary] = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_t: Optional[float] = None
    training: bool = False
    finished: bool = False
    last_step_wall: Optional[float] = None
    pumps: list = field(default_factory=list)  # the output readers of this rank's streams
    guard_signal: Optional[int] = None  # the signal number the guard's authenticated "exited" event gave
    # Progress read from the output of programs that are not ours (mlx-lm's report lines).
    program: programs.ProgramOutput = field(default_factory=programs.ProgramOutput)
    phases: list = field(default_factory=list)  # PhaseSummary per `report.phase(...)` the rank ended
    killed: bool = False  # orch had to SIGKILL it (the guard did not stop it in time)
    batch_share: Optional[int] = None  # --balance speed: samples per micro-batch (rebalance events)
    memory_plan: Optional[MemoryPlanSummary] = None  # the rank's predicted peak and budget (memory_plan event)
    cpu_s: Optional[float] = None  # CPU seconds of its process tree, from the guard's last sample
    cpu_t: Optional[float] = None  # when that sample arrived (monotonic)
    stopped: Optional[bool] = None  # the guard's latest word: the rank's process is stopped (SIGSTOP)

    def diagnosis(self, plan: Optional[JobPlan] = None) -> Optional[Diagnosis]:
        signal_ = self.status.signal if self.status else None
        # A rank that trained was initialised, even if no init hook reported it (a program that is not ours).
        initialised = self.ready or self.training or self.steps is not None
        return classify(self.tail, self.rank, plan, signal=signal_, initialised=initialised)

    @property
    def rank(self) -> int:
        return self.spec.rank


class _LineOut:
    """One output stream of one rank: pieces of lines in; events, log bytes, console lines and the tail out.

    The log gets every byte the rank wrote (event lines excepted), written with
    ``os.write`` so a failing disk raises here, where it is handled, and never
    later from a buffer at close. The console gets each line once it is
    complete: what a terminal would show of it (the text after its last ``\\r``)
    and, for a line over ``CONSOLE_LINE_MAX``, a cut with a note where the whole is.
    """

    def __init__(self, sup: "Supervisor", state: RankState, console: Console):
        self.sup = sup
        self.state = state
        self.console = console
        self.prefix = f"[{state.rank}] "
        self.size = 0  # bytes of the current line already passed on in pieces
        self.head = bytearray()  # its first CONSOLE_LINE_MAX bytes
        self.last = bytearray()  # and its last ones (where a \r progress bar's latest state is)
        self.log_ok = True
        self._log(b"")  # every rank has a log, even one that printed nothing

    def _grow(self, data: bytes) -> None:
        self.size += len(data)
        if len(self.head) < CONSOLE_LINE_MAX:
            self.head += data[:CONSOLE_LINE_MAX - len(self.head)]
        self.last += data[-CONSOLE_LINE_MAX:]
        del self.last[:-CONSOLE_LINE_MAX]

    def pieces(self, pieces: list[tuple[bytes, bool]]) -> None:
        log = bytearray()
        shown: list[str] = []
        for piece, ends in pieces:
            if not ends:
                self._grow(piece)
                log += piece
                continue
            text, payload = protocol.split_line(piece.decode("utf-8", "surrogateescape"))
            if payload is not None:
                self.state.program.note_event(payload)
                self._event(payload)
            if text is None and not self.size:
                continue
            for fields in self.state.program.feed(text or ""):  # e.g. mlx-lm's "iter train_loss ..." rows
                self._event({**fields, "rank": self.state.rank, "t": time.time(), "source": "output"})
            # Colour codes (rich forces them on even into a pipe) are dropped from the log and the console.
            data = programs.strip_ansi(text or "").encode("utf-8", "surrogateescape")
            if not data.endswith(b"\n"):
                data += b"\n"
            log += data
            shown.append(self._line(data))
        if log:
            self.sup._activity()
        self._log(bytes(log))
        self._show(shown)

    def _event(self, payload: dict) -> None:
        try:
            self.sup._on_event(self.state, payload)
        except Exception as e:  # a bad event must never stop the output of a rank
            self.sup._note(f"orch: ignoring an event from rank {self.state.rank} that could not be handled: {e!r}\n")

    def _line(self, data: bytes) -> str:
        """The complete line ``data`` ends as the console shows it (and the tail keeps it)."""
        if not self.size and len(data) <= CONSOLE_LINE_MAX:
            text, cut = _visible(data.decode("utf-8", "replace")), ""
        else:
            self._grow(data)
            where = self.sup.rundir.logs / f"rank-{self.state.rank}.log"
            try:
                where = where.relative_to(self.sup.rundir.path)
            except ValueError:
                pass
            bar = b"\r" in self.last.rstrip(b"\r\n")
            text = _visible((self.last if bar else self.head).decode("utf-8", "replace"))
            cut = f" … [cut: {human_bytes(self.size)}, full line in {where}]"
            self.size = 0
            self.head.clear()
            self.last.clear()
        line = text + cut
        self.state.tail.append(line)
        return line

    def _log(self, data: bytes) -> None:
        if not self.log_ok:
            return
        path = self.sup.rundir.logs / f"rank-{self.state.rank}.log"
        try:
            fd = self.sup.rundir.log(self.state.rank).fileno()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except Exception as e:  # disk full, file gone: a clear failure, and the output keeps draining
            self.log_ok = False
            self.sup._write_failed(path, e)

    def _show(self, lines: list[str]) -> None:
        if not lines or not self.sup.opts.echo or self.console.broken:
            return
        with self.sup.live.around_output():
            self.console.write("".join(f"{self.prefix}{line}\n" for line in lines))
            self.console.flush()


def _visible(text: str) -> str:
    """What a terminal shows of one line: no newline, only the text after its last carriage return."""
    text = text.rstrip("\n")
    if text.endswith("\r"):
        text = text.rstrip("\r")
    if "\r" in text:
        segments = [seg for seg in text.split("\r") if seg]
        text = segments[-1] if segments else ""
    return text


@dataclass
class Failure:
    rank: Optional[int]
    exit_code: int
    reason: str


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
        on_event: Optional[Callable[[RankState, dict], None]] = None,
    ):
        self.plan = plan
        self.launcher = launcher
        self.rundir = rundir
        self.script = script
        self.opts = options or SupervisorOptions()
        self.out = out if isinstance(out, Console) else Console(out)
        self.err = err if isinstance(err, Console) else Console(err)
        self.on_event = on_event
        self.states = [RankState(spec=s) for s in specs]
        self.ring_start = RingStart.for_plan(plan)  # the gate and the hold: which lines a listener or an exit unlocks
        self.metrics: dict = {}
        self.rebalances: list[RebalanceSummary] = []  # --balance speed, from rank 0's events
        self.diagnosis: Optional[Diagnosis] = None
        self.failure: Optional[Failure] = None
        self.interrupted: Optional[int] = None
        self.init_deadline: Optional[float] = None
        self._wake = asyncio.Event()
        # --stdin: bytes each rank's guard has fed it, the ranks whose stdin is closed, and a wake-up.
        self._stdin_read: dict[int, int] = {}
        self._stdin_closed: set[int] = set()
        self._stdin_more = asyncio.Event()
        self._failed: list[RankState] = []
        self._settle_deadline: Optional[float] = None
        self._first_failure_t: float = 0.0
        self._last_progress: Optional[float] = None
        self._any_step = False
        self._last_activity: Optional[float] = None  # output or CPU progress of any rank (idle watchdog)
        self._unwritable: set = set()  # log/event files that failed to write (reported once each)
        self.live = LiveView(self.states, err=self.err, tty=self.opts.live)

    # ---- the run -------------------------------------------------------
    async def run(self) -> RunSummary:
        t0 = time.monotonic()
        started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        loop = asyncio.get_running_loop()
        if self.opts.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._interrupt, sig)
        tasks: list[asyncio.Task] = []
        self._last_activity = time.monotonic()
        forward = None
        try:
            await self._start_all(tasks)
            if self.opts.stdin_relay is not None and self.opts.stdin_ranks:
                forward = asyncio.create_task(self._forward_stdin())
            await self._monitor()
        finally:
            if forward is not None:  # what is not yet taken stays in the relay for the next attempt
                forward.cancel()
                await asyncio.gather(forward, return_exceptions=True)
            await self._stop_all()
            await self._drain(tasks)  # the launcher is its owner's to collect from and close (job.py)
            if self.opts.handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        summary = self._summary(time.monotonic() - t0, started_at)
        self._report(summary)
        return summary

    async def _forward_stdin(self) -> None:
        """``--stdin``: the controller's input to the chosen ranks' guards, framed as control lines.

        End of file here is ``stdin-eof`` there (the rank reads end of file and
        runs on); only the control channel's own end of file stops a rank.
        """
        from orchestrator.stdin_relay import stdin_line

        targets = [s for s in self.states if s.rank in self.opts.stdin_ranks]
        sent = {s.rank: 0 for s in targets}
        while True:
            data = await self.opts.stdin_relay.get()
            if data is not None:
                try:
                    await self._stdin_room(targets, sent)
                except asyncio.CancelledError:  # the attempt ended: this chunk is the next attempt's
                    self.opts.stdin_relay.unget(data)
                    raise
            line = protocol.CONTROL_STDIN_EOF if data is None else stdin_line(data)
            for s in targets:
                if s.handle is not None and not s.exited.is_set():
                    s.handle.forward_stdin(line)
                    sent[s.rank] += len(data or b"")
            if data is None:
                return

    async def _stdin_room(self, targets: list["RankState"], sent: dict[int, int]) -> None:
        """Wait until no rank that still reads has STDIN_WINDOW bytes it has not been fed (its guard's
        ``stdin_read`` events say); rechecked every second, so a rank that exits frees the others."""
        while True:
            full = [s for s in targets if s.handle is not None and not s.exited.is_set()
                    and s.rank not in self._stdin_closed
                    and sent[s.rank] - self._stdin_read.get(s.rank, 0) >= protocol.STDIN_WINDOW]
            if not full:
                return
            self._stdin_more.clear()
            try:
                await asyncio.wait_for(self._stdin_more.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _interrupt(self, sig: int) -> None:
        if self.interrupted is None:
            self.interrupted = sig
            self.err.write(f"\norch: {signal_name(sig)} received; stopping all ranks\n")
        self._wake.set()

    async def _start_all(self, tasks: list[asyncio.Task]) -> None:
        async def start(state: RankState) -> None:
            try:
                state.handle = await self.launcher.start(state.spec)
            except Exception as e:  # a launcher error is a run failure, reported once
                state.status = ExitStatus(code=127, signal=None)
                state.exited.set()
                self._fail(state.rank, 127, f"could not start rank {state.rank} on {state.spec.host}: {e}")
                return
            state.pumps = [asyncio.create_task(self._pump(state, state.handle.stdout, self.out)),
                           asyncio.create_task(self._pump(state, state.handle.stderr, self.err))]
            tasks.extend(state.pumps)
            tasks.append(asyncio.create_task(self._watch(state)))

        await asyncio.gather(*(start(s) for s in self.states))

    async def _monitor(self) -> None:
        while True:
            all_exited = all(s.exited.is_set() for s in self.states)
            if self._failed and self.failure is None:
                if self._settle_deadline is None:
                    self._first_failure_t = time.monotonic()
                    self._settle_deadline = self._first_failure_t + SETTLE_S
                if not all_exited and time.monotonic() >= self._settle_deadline and self._only_secondary():
                    # Everyone who failed only reacted to another rank: give that rank time to fail too.
                    longest = self._first_failure_t + SECONDARY_WAIT_S
                    if self._settle_deadline < longest:
                        self._settle_deadline = longest
                if all_exited or time.monotonic() >= self._settle_deadline:
                    self._name_root_cause()
            if self.failure or self.interrupted or all_exited:
                return
            deadlines = [d for d in (self._settle_deadline,) if d is not None]
            if self.init_deadline is not None and not all(s.ready or s.exited.is_set() for s in self.states):
                deadlines.append(self.init_deadline)
            hang = self._hang_deadline()
            if hang is not None:
                deadlines.append(hang)
            idle = self._idle_deadline()
            if idle is not None:
                deadlines.append(idle if time.monotonic() < idle else idle + IDLE_SAMPLE_WAIT_S)
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                now = time.monotonic()
                if self.init_deadline is not None and now >= self.init_deadline:
                    self._init_timed_out()
                hang = self._hang_deadline()
                if self.failure is None and hang is not None and now >= hang:
                    await self._dump_stacks()
                    self._hang_detected()
            self._wake.clear()
            if self.failure is None and self.interrupted is None and self._idle_due(time.monotonic()):
                await self._dump_stacks()
                self._hang_detected(idle=True)

    def _hang_deadline(self) -> Optional[float]:
        """When the watchdog fires: armed once a trainer starts, until every trainer finished."""
        if self._last_progress is None:
            return None
        active = [s for s in self.states if s.training and not s.finished and not s.exited.is_set()]
        if not active:
            return None
        return self._last_progress + (self.opts.hang_timeout if self._any_step else self.opts.first_step_timeout)

    def _idle_deadline(self) -> Optional[float]:
        """When the idle watchdog fires: for programs that report no steps (not ours, or not yet).

        Such a program gives the step watchdog nothing to time, so a hang is
        what is left to see from outside: for ``hang_timeout``, no rank printed
        anything and no rank's CPU time advanced. Armed only while no rank has
        ever reported a step, and only once every running rank's guard has sent
        a CPU sample (without one we cannot tell idle from busy).
        """
        if not self.opts.idle_watchdog or self._any_step or self._last_activity is None:
            return None
        running = [s for s in self.states if s.handle is not None and not s.exited.is_set()]
        if not running or any(s.cpu_s is None for s in running):
            return None
        return self._last_activity + self.opts.hang_timeout

    def _idle_due(self, now: float) -> bool:
        """The idle window has passed and every running rank's CPU reading covers it (or waiting for one is over)."""
        idle = self._idle_deadline()
        if idle is None or now < idle:
            return False
        running = [s for s in self.states if s.handle is not None and not s.exited.is_set()]
        return now >= idle + IDLE_SAMPLE_WAIT_S or all(s.cpu_t is not None and s.cpu_t >= idle for s in running)

    def _activity(self, now: Optional[float] = None) -> None:
        """A rank printed something or used CPU: the idle watchdog starts over."""
        self._last_activity = time.monotonic() if now is None else now

    def _cpu_sample(self, state: RankState, cpu_s) -> None:
        if type(cpu_s) not in (int, float):
            return
        now = time.monotonic()
        first = state.cpu_s is None
        if not first and cpu_s - state.cpu_s > max(IDLE_CPU_MIN_S, IDLE_CPU_RATE * (now - state.cpu_t)):
            self._activity(now)
        state.cpu_s, state.cpu_t = float(cpu_s), now
        idle = self._idle_deadline()
        if first or (idle is not None and now >= idle):
            self._wake.set()  # this sample may arm the idle watchdog, or complete its evidence

    async def _dump_stacks(self) -> None:
        """Ask every running rank's guard for its Python stacks (into its stderr, so its log and tail).

        Bounded: the dump is written by faulthandler from a signal handler, so a
        rank that is running at all answers within milliseconds, even one stuck
        in C code without the GIL (faulthandler needs no GIL). A stopped one
        (SIGSTOP) cannot: its guard answers a ``dump`` event saying so instead,
        and we do not wait for it.
        """
        running = [s for s in self.states if s.handle is not None and not s.exited.is_set()]
        for s in running:
            s.tail.append(STACK_MARK)  # the frames that follow in the tail are this dump's
            if isinstance(s.handle, ControlChannel):  # under mpirun no guard can be asked
                try:
                    s.handle.send_control(protocol.CONTROL_DUMP)
                except Exception:
                    pass
        await asyncio.sleep(STACK_WAIT_S if running else 0)

    def _hang_detected(self, idle: bool = False) -> None:
        """Fail the run as hung, saying where each rank is.

        ``idle``: the idle watchdog fired (no rank ever reported a step; no
        output and no CPU progress anywhere). Each rank gets one of: its top
        frames from the stack dump just requested, or "is stopped" when its
        guard found it stopped (a stopped process cannot dump its stack).
        """
        if idle:
            limit, option = self.opts.hang_timeout, "--hang-timeout"
        elif self._any_step:
            limit, option = self.opts.hang_timeout, "--hang-timeout"
        else:
            limit, option = self.opts.first_step_timeout, "--first-step-timeout"
        running = [s for s in self.states if not s.exited.is_set()]
        by_step: dict = {}
        for s in running:
            by_step.setdefault(s.steps, []).append(s)
        known = sorted((k for k in by_step if k is not None))
        parts = []
        suspect = None
        stopped = [s for s in running if self._stopped_note(s)]
        if idle:
            for st in stopped:
                parts.append(f"rank {st.rank} {self._stopped_note(st)}")
        else:
            order = ([None] if None in by_step else []) + known
            for k in order:
                group = by_step[k]
                ranks = ",".join(str(s.rank) for s in group)
                label = f"rank{'s' if len(group) > 1 else ''} {ranks}"
                if k is None:
                    parts.append(f"{label} never reported a step")
                else:
                    when = time.strftime("%H:%M:%S", time.localtime(group[0].last_step_wall)) if group[0].last_step_wall else "?"
                    parts.append(f"{label} last reported step {k} at {when}")
                for st in group:
                    note = self._stopped_note(st)
                    if note:
                        parts[-1] += f" (rank {st.rank} {note})"
        if running:
            if stopped:
                parts.append("the running ranks' Python stacks are in their logs (logs/rank-N.log); "
                             "a stopped process cannot dump its stack")
            else:
                parts.append("every rank's Python stacks are in its log (logs/rank-N.log)")
        for st in running:
            where = programs.top_frames(list(st.tail), STACK_MARK)
            if where:
                parts.append(f"rank {st.rank} is in {where}")
        # Programs whose progress only rank 0 prints (mlx-lm): ranks that never
        # report are not suspects for that alone.
        silent_by_design = None in by_step and bool(known)
        lowest = (by_step.get(None) if not silent_by_design else None) or (by_step[known[0]] if known else [])
        if len(stopped) == 1:
            suspect = stopped[0]
        elif not idle and len(lowest) == 1 and len(running) > 1:
            suspect = lowest[0]
        if suspect is not None and len(running) > 1:
            parts.append(f"the others may be waiting for rank {suspect.rank}" if idle else
                         f"the others are likely blocked in a collective waiting for rank {suspect.rank}")
        if idle:
            head = (f"hang: no rank printed anything or used CPU for {limit:g}s ({option}), "
                    "and no rank reports steps")
        else:
            head = f"hang: no rank made progress for {limit:g}s ({option})"
        self._fail(suspect.rank if suspect else None, 1, head + (": " + "; ".join(parts) if parts else ""))

    def _stopped_note(self, state: RankState) -> str:
        """What is known about a silent rank's process: its guard's word, else (local ranks) the OS's."""
        if state.stopped is not None:
            return STOPPED_NOTE if state.stopped else ""
        if not state.pid or self.launcher.name != "local":
            return ""
        try:
            import psutil

            st = psutil.Process(state.pid).status()
        except Exception:
            return ""
        return STOPPED_NOTE if st == psutil.STATUS_STOPPED else ""

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
        if st.signal_label and root.guard_signal is not None:  # SSH could not name it; the guard numbered it
            how += f" (signal {root.guard_signal} on {root.spec.host})"
        if st.reason:
            how += f": {st.reason}"
        others = [s.rank for s in self._failed if s is not root]
        note = f" (then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} failed too)" if others else ""
        self._fail(root.rank, st.shell_code, f"rank {root.rank} ({root.spec.host}) {how}{note}")
        self.diagnosis = root.diagnosis(self.plan)

    def _init_timed_out(self) -> None:
        waiting = [s for s in self.states if not s.ready and not s.exited.is_set()]
        if not waiting:
            return
        names = ", ".join(f"{s.rank} ({s.spec.host}{', never called init' if not s.init_started else ''})" for s in waiting)
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
        running = [s for s in self.states if s.handle is not None and not s.exited.is_set()]
        if not running:
            return
        for s in running:
            s.handle.stop()
        waits = [asyncio.create_task(s.exited.wait()) for s in running]
        done, pending = await asyncio.wait(waits, timeout=self.opts.stop_timeout)
        if pending:
            for s in running:
                if not s.exited.is_set():
                    s.killed = True
                    s.handle.kill()
            await asyncio.wait(pending, timeout=2.0)
        for t in waits:
            t.cancel()

    async def _drain(self, tasks: list[asyncio.Task]) -> None:
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=2.0)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # ---- output and events ---------------------------------------------
    async def _pump(self, state: RankState, stream, echo_to: Console) -> None:
        """Copy one output stream of a rank to its log and the console, and take its events.

        A pump never dies before end of file: whatever goes wrong with one line
        (a bad event, a closed console, a full disk) is handled and the pump reads
        on, because a rank whose pipe is not drained blocks forever on a write.
        Lines have no length limit in the log; the console shows an over-long
        line cut, with a note saying where the whole line is.
        """
        out = _LineOut(self, state, echo_to)
        lines = LineSplitter()
        while True:
            try:
                chunk = await stream.read(READ_CHUNK)
            except Exception:  # the stream broke (connection lost): nothing more will come
                chunk = b""
            if isinstance(chunk, str):
                chunk = chunk.encode("utf-8", "surrogateescape")
            try:
                out.pieces(lines.feed(chunk) if chunk else lines.end())
            except Exception as e:  # never reached by design; still, the pump must go on
                self._note(f"orch: output of rank {state.rank} could not be handled: {e!r}\n")
            if not chunk:
                return

    def _note(self, text: str) -> None:
        try:
            self.err.write(text)
            self.err.flush()
        except Exception:
            pass

    def _write_failed(self, path, exc: BaseException) -> None:
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
            self._write_failed(self.rundir.path / "events.jsonl", e)

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

    def _on_event(self, state: RankState, payload: dict) -> None:
        payload = dict(payload)
        kind = payload.get("kind")
        authentic = False
        if kind not in protocol.GUARD_KINDS:
            payload.pop(protocol.TOKEN_FIELD, None)  # a token is never logged, whoever sent it
        else:
            verdict = self._guard_event_ok(state, payload)
            if verdict is None:
                self._record({**payload, "kind": f"forged:{kind}", "recv_t": time.time(), "from_rank": state.rank,
                              "attempt": self.opts.attempt})
                return
            authentic = verdict
        payload = {**payload, "recv_t": time.time(), "from_rank": state.rank, "attempt": self.opts.attempt}
        if event_validation.validate({k: v for k, v in payload.items() if k not in ("recv_t", "from_rank", "attempt")}) is None:
            payload["kind"] = f"unknown:{payload.get('kind')}"
            self._record(payload)
            return
        if kind == "stdin_read":  # --stdin flow control (not logged: one per line typed, or per 256 KiB piped)
            self._stdin_read[state.rank] = max(self._stdin_read.get(state.rank, 0), payload["bytes"])
            if payload["closed"]:
                self._stdin_closed.add(state.rank)
            self._stdin_more.set()
            return
        self._record(payload)
        if kind not in ("rss", "dump"):  # a rank's own event is a sign of life; the guard's samples are not
            self._activity()
        if kind == "spawned":
            pid = payload["pid"]
            # Only the guard's own word, once per attempt, and never 0/1 (or a group-wide -1).
            if authentic and state.pid is None and type(pid) is int and pid > 1:
                state.pid = pid
                state.handle.rank_pid = pid
        elif kind == "exited":
            if authentic and type(payload.get("signal")) is int:
                state.guard_signal = payload["signal"]
        elif kind == "init_start":
            state.init_started = True
            if self.init_deadline is None:
                self.init_deadline = time.monotonic() + self.opts.init_timeout
                self._wake.set()
        elif kind == "listening":
            state.listening = True
            self._send_ring_lines(self.ring_start.listening(state.spec.rank))
        elif kind == "ready":
            state.ready = True
            self._wake.set()
        elif kind == "train_start":
            state.training = True
            if self._last_progress is None:
                self._last_progress = time.monotonic()
                self._wake.set()
        elif kind == "finished":
            state.finished = True
            self._wake.set()
        elif kind == "step":
            state.training = True
            self._last_progress = time.monotonic()
            if not self._any_step:  # the watchdog switches from the first-step to the hang timeout
                self._any_step = True
                self._wake.set()
            state.last_step_wall = payload.get("t")
            state.steps = payload["step"]
            state.total_steps = payload.get("total_steps")
            state.last_loss = payload["loss"]
            state.samples_per_s = payload["samples_per_s"]
        elif kind == "memory":
            m = state.memory or MemorySummary()
            m.mlx_peak_bytes = max(m.mlx_peak_bytes, payload["mlx_peak_bytes"])
            m.mlx_active_bytes = payload["mlx_active_bytes"]
            m.mlx_cache_bytes = payload["mlx_cache_bytes"]
            m.rss_peak_bytes = max(m.rss_peak_bytes, payload["rss_bytes"])
            avail = payload["system_available_bytes"]
            m.system_available_min_bytes = avail if m.system_available_min_bytes is None else min(m.system_available_min_bytes, avail)
            m.metal_max_recommended_working_set_size = payload.get("metal_max_recommended_working_set_size")
            state.memory = m
        elif kind == "rss":  # the guard's sampling: memory, CPU and run state for any program, ours or not
            self._cpu_sample(state, payload.get("cpu_s"))
            if type(payload.get("stopped")) is bool:
                state.stopped = payload["stopped"]
            m = state.memory or MemorySummary()
            m.rss_peak_bytes = max(m.rss_peak_bytes, payload["rss_bytes"])
            avail = payload.get("system_available_bytes")
            if avail is not None:
                m.system_available_min_bytes = avail if m.system_available_min_bytes is None else min(m.system_available_min_bytes, avail)
            state.memory = m
        elif kind == "dump":  # the guard's answer to a stack-dump request
            state.stopped = payload["stopped"]
        elif kind == "phase":
            state.phases.append(PhaseSummary.model_validate({k: payload.get(k) for k in PhaseSummary.model_fields}))
        elif kind == "metric":
            self.metrics.update(payload.get("values", {}))
        elif kind == "memory_plan":
            state.memory_plan = MemoryPlanSummary.model_validate({k: payload.get(k) for k in MemoryPlanSummary.model_fields})
        elif kind == "rebalance":  # every rank sends the same shares; each keeps its own, rank 0's go to the summary
            shares = payload["shares"]
            state.batch_share = shares[state.rank] if state.rank < len(shares) else None
            if state.rank == 0:
                self.rebalances.append(RebalanceSummary.model_validate({k: payload.get(k) for k in RebalanceSummary.model_fields if payload.get(k) is not None}))
        self.live.on_event(state, payload)
        if self.on_event is not None:
            self.on_event(state, payload)

    def _send_ring_lines(self, lines: list[tuple[int, str]]) -> None:
        """The ring start's ``release``/``go`` (orchestrator/ringstart.py), to ranks still running."""
        by_rank = {s.spec.rank: s for s in self.states}
        for rank, line in lines:
            s = by_rank.get(rank)
            if s is not None and isinstance(s.handle, ControlChannel) and not s.exited.is_set():
                s.handle.send_control(line)

    # ---- the end ---------------------------------------------------------
    def _summary(self, duration: float, started_at: str) -> RunSummary:
        if self.interrupted is not None:
            status, code = "interrupted", 128 + self.interrupted
        elif self.failure is not None:
            status, code = "failed", self.failure.exit_code
        else:
            status, code = "succeeded", 0
        ranks = [
            RankSummary(
                rank=s.rank,
                host=s.spec.host,
                pid=s.pid,
                exit_code=s.status.code if s.status else None,
                signal=s.status.signal if s.status else None,
                steps=s.steps,
                last_loss=s.last_loss,
                samples_per_s=s.samples_per_s,
                memory=s.memory,
                phases=s.phases,
                batch_share=s.batch_share,
                memory_plan=s.memory_plan,
            )
            for s in self.states
        ]
        return RunSummary(
            status=status,
            exit_code=code,
            failed_rank=self.failure.rank if self.failure and status == "failed" else None,
            reason=self.failure.reason if self.failure and status == "failed" else None,
            diagnosis=self.diagnosis.message if self.diagnosis and status == "failed" else None,
            diagnosis_cause=self.diagnosis.cause if self.diagnosis and status == "failed" else None,
            warnings=self._warnings(),
            duration_s=round(duration, 3),
            started_at=started_at,
            script=self.script,
            backend=self.plan.backend,
            world_size=self.plan.world_size,
            run_dir=str(self.rundir.path),
            ranks=ranks,
            metrics=self.metrics,
            rebalances=self.rebalances,
        )

    def _warnings(self) -> list[str]:
        """What a person must know after the run; today: JACCL ranks that had to be SIGKILLed.

        JACCL survivors of a dead peer can spin and ignore SIGTERM (MLX #3910,
        #4278), so the grace-then-SIGKILL path is their normal end, and a
        SIGKILLed process can leave its RDMA-registered memory wired until reboot.
        """
        if self.plan.backend not in ("jaccl", "jaccl-ring"):
            return []
        from orchestrator.backends import jaccl

        killed = [s for s in self.states if s.killed or (s.status is not None and s.status.signal == signal.SIGKILL)]
        if not killed:
            return []
        where = ", ".join(f"rank {s.rank} on {s.spec.host}" for s in killed)
        return [f"{jaccl.SIGKILL_WARNING} ({where})"]

    def _report(self, summary: RunSummary) -> None:
        for w in summary.warnings:
            self._note(f"orch: warning: {w}\n")
        self.live.clear()
        table = self.live.final_table()
        if table:
            self.err.write(table)
        if summary.status == "failed" and self.failure is not None:
            self.err.write(f"orch: run failed: {self.failure.reason}\n")
            if self.diagnosis is not None:
                self.err.write(f"orch: diagnosis: {self.diagnosis.message}\n")
            if self.failure.rank is not None:
                tail = list(self.states[self.failure.rank].tail)[-SHOW_LINES:]
                if tail:
                    self.err.write(f"orch: last lines of rank {self.failure.rank}:\n")
                    for line in tail:
                        self.err.write(f"    {line}\n")
        elif summary.status == "interrupted":
            self.err.write("orch: run interrupted; all ranks stopped\n")
        self.err.write(f"orch: {summary.status} in {summary.duration_s:.2f}s; run directory {summary.run_dir}\n")
        self.err.flush()
