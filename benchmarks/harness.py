"""The one way benchmarks here time a command beside its anchor.

Every benchmark in this directory answers "how does orch compare with the tool
people would otherwise use", so each measures the two **in the same run**,
alternating run by run, and prints medians and their ratio. Load on a shared
machine drifts by minutes; two series measured one after the other would
compare the drift, not the launchers. This module holds the parts the scripts
share:

* :func:`timed` runs one command, bounded, and returns its wall time. A
  command that fails, or whose output fails the script's own success check,
  ends the benchmark with the tail of its output (``mlx.launch`` exits 0 when
  ranks fail, so the exit code alone proves nothing).
* :func:`alternate` runs the arms in turn, round by round, so every arm sees
  the same load.
* :func:`summary` and :func:`ratio` reduce the times; the ratio can be taken
  to the anchor's best run as well as to its median (``mlx.launch`` sometimes
  loses its 1 s connect back-off and sometimes not: its median and its best
  differ by a second).
* :func:`result_line` prints the one ``RESULT {json}`` line that RESULTS.md
  collects.

Only the standard library: the scripts import it as ``from harness import ...``
with benchmarks/ on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

ROOT = Path(__file__).resolve().parent.parent

# stdin for a command: None (inherit), a path (read from that file), or IDLE
# (a pipe held open and never written, as a terminal nobody types in).
IDLE = "idle"


class CommandFailed(SystemExit):
    """A timed command failed, timed out or failed its success check.

    A ``SystemExit`` so that, uncaught, it ends the benchmark with its message
    and exit code 1 as the scripts always did, with no traceback; a script that
    keeps going past a failed run (launch_latency_ssh.py) catches it.
    """

    def __init__(self, message: str, run: Optional["Run"] = None):
        super().__init__(message)
        self.message = message
        self.run = run


@dataclass
class Run:
    """One finished command: what its success check reads."""

    argv: list
    seconds: float
    returncode: int
    stdout: str
    stderr: str

    def tail(self, chars: int = 1500) -> str:
        """The end of its stderr, or of its stdout where stderr is empty (merged or silent)."""
        return (self.stderr or self.stdout)[-chars:]


# A success check returns True (ok), or False or a string saying what is wrong.
Check = Callable[[Run], Union[bool, str, None]]


def run(argv: Sequence, *, cwd: Union[Path, str, None] = ROOT, env: Optional[Mapping[str, str]] = None,
        timeout: float = 120.0, stdin: Union[None, str, Path] = None, merge_stderr: bool = False) -> Run:
    """Run ``argv`` to the end, bounded by ``timeout``; never raises for a failure (see :func:`timed`).

    The command runs in its own session; on timeout the whole session is
    killed (a launcher's ranks included), and the run counts as failed with
    return code -9. Its output goes to unnamed files, not pipes: nothing to
    drain while it runs, and an idle stdin can stay open without a reader
    thread. ``merge_stderr`` sends stderr into stdout, in order.
    """
    argv = [str(a) for a in argv]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(tempfile.TemporaryFile())
        err = subprocess.STDOUT if merge_stderr else stack.enter_context(tempfile.TemporaryFile())
        if stdin == IDLE:
            stdin_arg = subprocess.PIPE
        elif stdin is not None:
            stdin_arg = stack.enter_context(open(stdin, "rb"))
        else:
            stdin_arg = None
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=cwd, env=dict(env) if env is not None else None, stdin=stdin_arg,
                             stdout=out, stderr=err, start_new_session=True)
        # A blocking wait, bounded by a timer that kills the session: Popen.wait(timeout=...) polls with sleeps
        # of up to 50 ms, which rounded every launch time up to the next poll (both launchers, 50 ms steps).
        expired = threading.Event()

        def _expire() -> None:
            expired.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        timer = threading.Timer(timeout, _expire)
        timer.start()
        try:
            rc = p.wait()
            seconds = time.perf_counter() - t0
            note = ""
            if expired.is_set():
                rc, note = -9, f"\n(did not finish in {timeout:g} s: killed)\n"
        finally:
            timer.cancel()
            if p.stdin is not None:  # the idle stdin closes once the command has ended
                p.stdin.close()
        texts = []
        for f in (out, err):
            if f is subprocess.STDOUT:
                texts.append("")
            else:
                f.seek(0)
                texts.append(f.read().decode(errors="replace"))
    return Run(argv, seconds, rc, texts[0], texts[1] + note)


def timed(argv: Sequence, *, check: Optional[Check] = None, what: Optional[str] = None, **kw) -> float:
    """Wall time of one run of ``argv`` that succeeded: exit code 0 and ``check`` passed.

    Otherwise raises :class:`CommandFailed` naming the command (``what``, else
    its first argument), the exit code, what the check said and the tail of its
    output. Keyword arguments are :func:`run`'s.
    """
    return timed_run(argv, check=check, what=what, **kw).seconds


def timed_run(argv: Sequence, *, check: Optional[Check] = None, what: Optional[str] = None, **kw) -> Run:
    """:func:`timed`, returning the whole :class:`Run` (its output too)."""
    r = run(argv, **kw)
    why = None
    if r.returncode != 0:
        why = f"rc {r.returncode}"
    elif check is not None:
        verdict = check(r)
        if verdict is False or isinstance(verdict, str):
            why = verdict or "its success check failed"
    if why:
        raise CommandFailed(f"{what or r.argv[0]} failed ({why}):\n{r.tail()}", r)
    return r


def count_check(needle: str, count: int) -> Check:
    """Success when ``needle`` appears exactly ``count`` times on stdout (e.g. one " OK" per rank)."""

    def check(r: Run) -> Union[bool, str]:
        n = r.stdout.count(needle)
        return True if n == count else f"{n}/{count} {needle.strip()!r}"

    return check


def alternate(arms: Mapping[str, Callable[[int], float]], runs: int, *, warmup: int = 0, swap: bool = False,
              progress: Optional[Callable[[int, str, float, bool], None]] = None,
              failures: Optional[list] = None) -> dict[str, list[float]]:
    """Run every arm once per round, in turn, ``warmup + runs`` rounds; the times of the last ``runs`` rounds.

    ``arms[name](i)`` runs one measurement and returns its seconds; ``i`` counts
    rounds from 0, warm-up rounds first (their times are dropped). ``swap``
    reverses the order of the arms every other round, so no arm always runs
    right after another. ``progress(i, name, seconds, warm)`` is told of each
    run. ``failures``: a list to collect each :class:`CommandFailed` in (as
    ``(i, name, error)``), the others going on; without it the first failure
    ends the benchmark.
    """
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + runs):
        for name in (names[::-1] if swap and i % 2 else names):
            try:
                seconds = arms[name](i)
            except CommandFailed as e:
                if failures is None:
                    raise
                failures.append((i, name, e))
                continue
            warm = i < warmup
            if not warm:
                times[name].append(seconds)
            if progress is not None:
                progress(i, name, seconds, warm)
    return times


@dataclass
class Summary:
    n: int
    median: float
    mean: float
    min: float
    max: float

    def as_dict(self) -> dict:
        return {"n": self.n, "median": self.median, "mean": self.mean, "min": self.min, "max": self.max}


def summary(times: Sequence[float]) -> Summary:
    return Summary(len(times), statistics.median(times), statistics.mean(times), min(times), max(times))


def ratio(arm: Sequence[float], anchor: Sequence[float], to: str = "median") -> float:
    """The arm's median over the anchor's median (``to="median"``) or over the anchor's best run (``to="min"``)."""
    if to not in ("median", "min"):
        raise ValueError(f"to must be 'median' or 'min', not {to!r}")
    base = statistics.median(anchor) if to == "median" else min(anchor)
    return statistics.median(arm) / base


def ratios(times: Mapping[str, Sequence[float]], anchor: str) -> dict[str, dict[str, float]]:
    """Every other arm's median over the anchor's median and over its minimum."""
    return {name: {"to_median": ratio(ts, times[anchor]), "to_min": ratio(ts, times[anchor], to="min")}
            for name, ts in times.items() if name != anchor}


def result_line(name: str, **fields) -> str:
    """Print (and return) the one ``RESULT {json}`` line of a benchmark, for RESULTS.md; ``name`` says which."""
    line = "RESULT " + json.dumps({"benchmark": name, **fields})
    print(line, flush=True)
    return line


def tc_burst_bytes(rate: str, option: str = "--rate") -> int:
    """A ``tc tbf`` bucket of ~4 ms at ``rate`` (at least 256 KiB, enough for GSO-sized veth packets)."""
    for suffix, mult in {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}.items():
        if rate.endswith(suffix):
            return max(256 * 1024, int(float(rate[: -len(suffix)]) * mult / 8 * 0.004))
    raise SystemExit(f"{option} {rate!r}: give a rate like 1gbit or 500mbit")


def ranks_on_hosts(cluster, argv: Sequence[str], envs: Sequence[Mapping[str, str]], tmp: Union[Path, str],
                   timeout: float, what: str, tail: int = 2000) -> list[str]:
    """One rank per namespace host of ``cluster`` (``tests/netns.py``), rank r with ``envs[r]`` on top of this
    environment (without any MLX_/ORCH_/OMPI_/PMI variable of ours); every rank's output once all ended.

    Bounded: past ``timeout``, or as soon as one rank fails, the rest are killed (ours, by pid) and the run
    fails naming ``what`` with each rank's last ``tail`` characters.
    """
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for rank, extra in enumerate(envs):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "ORCH_", "OMPI_", "PMI"))}
            env.update(extra)
            log = open(Path(tmp) / f"rank-{rank}.log", "w+")
            logs.append(log)
            procs.append(cluster.popen(rank, list(argv), env=env, cwd=str(ROOT), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
        if any(p.poll() != 0 for p in procs):
            raise SystemExit(f"{what}: failed or timed out:\n" + "\n".join(o[-tail:] for o in outputs))
        return outputs
    finally:
        for p in procs:  # ours, by pid; the cluster's teardown kills anything else left in its namespaces
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for log in logs:
            log.close()


def tagged_json(output: str, tag: str) -> dict:
    """The one ``TAG {json}`` line a worker printed (e.g. rank 0's ``SUM_SCATTER_JSON {...}``), parsed."""
    (line,) = [x for x in output.splitlines() if x.startswith(tag + " ")]
    return json.loads(line.split(" ", 1)[1])


def clear_qdiscs(ends: Sequence[tuple[str, str]]) -> None:
    """Remove the root qdisc this benchmark put on each (namespace, interface): the shaping ends with it."""
    for ns, iface in ends:
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", iface, "root"], check=False,
                       capture_output=True, timeout=20)


def parse_rank_args(ap, argv: Sequence[str], *, iters: int, per: str):
    """The options every namespace-host benchmark shares (``--iters``, ``--warmup``, ``--timeout`` per
    ``per``, ``--worker``), added to ``ap``, then ``argv`` parsed (a leading ``--`` dropped)."""
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600, help=f"seconds per {per} before its ranks are killed")
    ap.add_argument("--worker", action="store_true", help="be one rank (the script starts these itself)")
    argv = list(argv)
    return ap.parse_args(argv[1:] if argv[:1] == ["--"] else argv)

