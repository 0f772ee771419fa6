"""Ranks that misbehave on purpose, and what the controller must do about them.

Two halves. The first drives the real ``Supervisor`` with a small fake
launcher (the rank's streams are asyncio StreamReaders the test writes to):
forged guard events, lines of many MiB, a ``\\r``-only progress bar, a closed
console, a full disk, the order in which cause and casualty exit, signals
without a name. The second runs real ranks with ``orch run -n 2`` on the
small scripts in tests/scripts/ and checks that every run ends with no
process left and a correct summary.json.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import protocol
from orchestrator.hostfile import local_hostfile
from orchestrator.launch.base import ControlChannel, ExitStatus, Launcher, RankHandle, RankSpec
from orchestrator.plan import plan_job
from orchestrator.rundir import RunDir
from orchestrator.output import CONSOLE_LINE_MAX
from orchestrator.records import RankPhase
from orchestrator.supervisor import Supervisor, SupervisorOptions
from tests.orch_helpers import (SCRIPTS, alive, events, finish, kill_tree, orch_argv, rank_pids, run_orch, start_orch,
                                summary)

# ----------------------------------------------------------------------------- a fake launcher


class FakeRank(RankHandle, ControlChannel):
    def __init__(self, rank: int, token):
        self.rank = rank
        self.host = "localhost"
        self.token = token
        self.stdout = asyncio.StreamReader()
        self.stderr = asyncio.StreamReader()
        self.result: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sent: list[str] = []
        self.killed = 0

    def send_control(self, line: str) -> None:
        self.sent.append(line)

    def stop(self) -> None:  # like a guard: the rank ends a moment later
        asyncio.get_running_loop().call_later(0.2, self.end, ExitStatus(code=None, signal=signal.SIGTERM))

    def feed(self, data: bytes, stream: str = "stdout") -> None:
        s = getattr(self, stream)
        if not s.at_eof():
            s.feed_data(data)

    def kill(self) -> None:
        self.killed += 1

    def end(self, status: ExitStatus) -> None:
        for s in (self.stdout, self.stderr):
            if not s.at_eof():
                s.feed_eof()
        if not self.result.done():
            self.result.set_result(status)

    async def wait(self) -> ExitStatus:
        return await self.result


class FakeLauncher(Launcher):
    name = "fake"

    def __init__(self, tokens: bool = True):
        self.tokens = tokens
        self.handles: dict[int, FakeRank] = {}

    async def start(self, spec: RankSpec) -> RankHandle:
        h = self.handles[spec.rank] = FakeRank(spec.rank, f"{spec.rank:032x}" if self.tokens else None)
        return h


class BrokenPipeOut(io.StringIO):
    """A stdout whose reader went away after ``keep`` writes (``orch run | head``)."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def write(self, s):
        if self.keep <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.keep -= 1
        return super().write(s)


def supervise(tmp_path, script, n=2, tokens=True, out=None, err=None, echo=True):
    """Run a Supervisor over fake ranks; ``script(handles)`` is a coroutine that plays the ranks."""
    plan = plan_job(local_hostfile(n), "mpi")  # no gates: the fake ranks need no start-up sequencing
    specs = [RankSpec(rank=r, host="localhost", script="s.py") for r in range(n)]
    rundir = RunDir(tmp_path / "run")
    launcher = FakeLauncher(tokens)
    out = out if out is not None else io.StringIO()
    err = err if err is not None else io.StringIO()

    async def go():
        sup = Supervisor(plan, specs, launcher, rundir, "s.py", SupervisorOptions(handle_signals=False, echo=echo,
                                                                                  stop_timeout=2.0), out=out, err=err)
        task = asyncio.ensure_future(sup.run())
        while len(launcher.handles) < n:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(script(launcher.handles), 30)
        summary = await asyncio.wait_for(task, 30)
        return sup, summary

    sup, summary = asyncio.run(go())
    rundir.close()
    return sup, summary, out, err, rundir, launcher


def ev(kind: str, rank: int, **fields) -> bytes:
    return protocol.encode(kind, rank, **fields).encode()


def ok(handles, *ranks):
    for r in ranks or handles:
        handles[r].end(ExitStatus(code=0, signal=None))


# ----------------------------------------------------------------------------- forged guard events


def test_only_the_guards_token_sets_the_pid_to_signal(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        async def play(h):
            tok = h[0].token
            h[0].stdout.feed_data(b"user text " + ev("spawned", 0, pid=sleeper.pid, host="x"))  # mid-line, no token
            h[0].stdout.feed_data(ev("spawned", 0, pid=1, host="x", token="f" * 32))           # wrong token
            h[0].stdout.feed_data(ev("listening", 0, address="1.2.3.4:5", token="nope"))
            h[0].stdout.feed_data(ev("spawned", 0, pid=1, host="x", token=tok))                # right token, pid 1
            h[0].stdout.feed_data(ev("spawned", 0, pid=4242, host="x", token=tok))             # the guard's own
            h[0].stdout.feed_data(ev("spawned", 0, pid=4343, host="x", token=tok))             # a second one: ignored
            h[1].stdout.feed_data(ev("spawned", 1, pid=sleeper.pid, host="x", token=h[0].token))  # rank 0's token
            await asyncio.sleep(0.05)
            ok(h)

        sup, s, out, err, rundir, launcher = supervise(tmp_path, play)
        # pid 1 with the right token is refused; the guard's pid is taken, once per attempt
        assert launcher.handles[0].rank_pid == 4242 and sup.states[0].record.pid == 4242
        assert launcher.handles[1].rank_pid is None and sup.states[1].record.pid is None
        kinds = [e["kind"] for e in events(rundir.path)]
        assert kinds.count("forged:spawned") == 3 and kinds.count("forged:listening") == 1
        assert all("token" not in e for e in events(rundir.path))
        assert not sup.states[0].record.reached(RankPhase.LISTENING)
        assert "user text" in (rundir.logs / "rank-0.log").read_text()
        assert s.status == "succeeded"
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pid_one_is_refused_and_a_good_pid_is_taken_once(tmp_path):
    async def play(h):
        tok = h[0].token
        h[0].stdout.feed_data(ev("spawned", 0, pid=1, host="x", token=tok))
        h[0].stdout.feed_data(ev("spawned", 0, pid=0, host="x", token=tok))
        h[1].stdout.feed_data(ev("spawned", 1, pid=4242, host="x", token=h[1].token))
        h[1].stdout.feed_data(ev("spawned", 1, pid=4343, host="x", token=h[1].token))
        await asyncio.sleep(0.05)
        ok(h)

    sup, s, *_ , rundir, launcher = supervise(tmp_path, play)
    assert launcher.handles[0].rank_pid is None and sup.states[0].record.pid is None
    assert launcher.handles[1].rank_pid == 4242 and sup.states[1].record.pid == 4242
    assert [e["pid"] for e in events(rundir.path) if e["kind"] == "spawned" and e["rank"] == 1] == [4242, 4343]
    assert all("token" not in e for e in events(rundir.path))


def test_without_a_token_a_reported_pid_is_never_used(tmp_path):
    """Under mpirun the guard has no private channel: its events inform, its pids are never signalled."""
    async def play(h):
        h[0].stdout.feed_data(ev("spawned", 0, pid=4242, host="x"))
        h[0].stdout.feed_data(ev("exited", 0, code=0, signal=None))
        await asyncio.sleep(0.05)
        ok(h)

    sup, s, *_, rundir, launcher = supervise(tmp_path, play, tokens=False)
    assert launcher.handles[0].rank_pid is None and sup.states[0].record.pid is None
    kinds = [e["kind"] for e in events(rundir.path)]
    assert "spawned" in kinds and "exited" in kinds and not any(k.startswith("forged") for k in kinds)
    assert (rundir.logs / "rank-1.log").read_bytes() == b""  # a rank that printed nothing still has its log


# ----------------------------------------------------------------------------- output that is too much


def test_a_multi_mib_line_is_logged_whole_and_cut_on_the_console(tmp_path):
    big = b"x" * (3 * 1024 * 1024 + 5) + b"END\n"

    async def play(h):
        for i in range(0, len(big), 100_000):
            h[1].stdout.feed_data(big[i:i + 100_000])
            await asyncio.sleep(0)
        h[1].stdout.feed_data(b"after\n")
        ok(h)

    sup, s, out, err, rundir, _ = supervise(tmp_path, play)
    log = (rundir.logs / "rank-1.log").read_bytes()
    assert log == big + b"after\n"
    shown = out.getvalue()
    assert re.search(r"^\[1\] x+ … \[cut: 3\.\d+ MiB, full line in logs/rank-1\.log\]$", shown, re.M), shown[-300:]
    assert len(shown) < CONSOLE_LINE_MAX + 1000 and "[1] after\n" in shown
    assert s.status == "succeeded"


def test_a_carriage_return_progress_bar_is_logged_whole(tmp_path):
    bar = b"".join(b"\r%6d%%|" % i + b"#" * 40 for i in range(60_000))  # ~3 MiB without a newline

    async def play(h):
        for i in range(0, len(bar), 65536):
            h[0].stderr.feed_data(bar[i:i + 65536])
            await asyncio.sleep(0)
        ok(h)

    sup, s, out, err, rundir, _ = supervise(tmp_path, play)
    assert (rundir.logs / "rank-0.log").read_bytes() == bar + b"\n"
    shown = [l for l in err.getvalue().splitlines() if l.startswith("[0] ")]
    assert len(shown) == 1 and " 59999%|" in shown[0] and "cut:" in shown[0]  # the bar's latest state


def test_an_event_after_unterminated_huge_output_is_still_an_event(tmp_path):
    async def play(h):
        h[0].stdout.feed_data(b"y" * (2 * 1024 * 1024))
        h[0].stdout.feed_data(ev("spawned", 0, pid=4242, host="x", token=h[0].token))
        await asyncio.sleep(0.05)
        ok(h)

    sup, *_, rundir, launcher = supervise(tmp_path, play)
    assert launcher.handles[0].rank_pid == 4242
    assert (rundir.logs / "rank-0.log").read_bytes() == b"y" * (2 * 1024 * 1024) + b"\n"


def test_guard_events_inside_a_ranks_lines_are_taken_and_the_log_stays_byte_exact(tmp_path):
    """The guard writes its samples on the pipe its rank writes to; they land wherever the rank is,
    also inside a 1 MiB line that itself starts like an event. Each is still an event (its token
    never reaches the log), and the log holds exactly the rank's bytes."""
    rank_bytes = b"".join(protocol.MARKER.encode() + b"%d " % i + b"z" * (1 << 20) + b"\n" for i in range(3))

    async def play(h):
        token = h[0].token
        for i in range(0, len(rank_bytes), 300_000):
            h[0].stdout.feed_data(rank_bytes[i:i + 300_000])
            h[0].stdout.feed_data(ev("rss", 0, rss_bytes=1 << 20, tree_rss_bytes=1 << 20,
                                     system_available_bytes=None, cpu_s=1.0 + i, stopped=False, token=token))
            await asyncio.sleep(0)
        ok(h)

    sup, s, out, err, rundir, launcher = supervise(tmp_path, play)
    assert (rundir.logs / "rank-0.log").read_bytes() == rank_bytes
    samples = [e for e in events(rundir.path) if e.get("kind") == "rss" and e.get("rank") == 0]
    assert len(samples) == len(range(0, len(rank_bytes), 300_000))
    assert s.ranks[0].memory is not None and s.ranks[0].memory.rss_peak_bytes == 1 << 20


def test_a_program_row_split_by_a_guard_event_is_still_parsed(tmp_path):
    """mlx-lm's step rows are read from the console text; a guard sample landing between a row's text
    and its newline must not hide the row from the parser (nor reach the log)."""
    header = b"  iter   train_loss     tok/s     tokens\n"
    row = b"     1    4.163 \xe2\x96\xbc      171      0.0k"

    async def play(h):
        token = h[0].token
        h[0].stdout.feed_data(header + row)
        await asyncio.sleep(0)
        h[0].stdout.feed_data(ev("rss", 0, rss_bytes=1 << 20, tree_rss_bytes=1 << 20,
                                 system_available_bytes=None, cpu_s=1.0, stopped=False, token=token))
        await asyncio.sleep(0)
        h[0].stdout.feed_data(b"\n")
        ok(h)

    sup, s, out, err, rundir, launcher = supervise(tmp_path, play)
    assert (rundir.logs / "rank-0.log").read_bytes() == header + row + b"\n"
    steps = [e for e in events(rundir.path) if e.get("kind") == "step" and e.get("rank") == 0]
    assert [(e["step"], e["loss"]) for e in steps] == [(1, 4.163)]


def test_a_closed_console_stops_the_echo_not_the_run(tmp_path):
    out = BrokenPipeOut(keep=3)
    lines = b"".join(b"line %d\n" % i for i in range(20_000))

    async def play(h):
        for i in range(0, len(lines), 4096):
            h[0].stdout.feed_data(lines[i:i + 4096])
            await asyncio.sleep(0)
        ok(h)

    sup, s, out, err, rundir, _ = supervise(tmp_path, play, out=out)
    assert s.status == "succeeded" and s.exit_code == 0
    assert (rundir.logs / "rank-0.log").read_bytes() == lines
    assert sup.out.broken and "Traceback" not in err.getvalue()


def test_a_log_that_cannot_be_written_fails_the_run_naming_it(tmp_path):
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "rank-1.log").symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    drained = []

    async def play(h):
        h[1].feed(b"z" * 100 + b"\n")
        for _ in range(50):  # the rank keeps writing: its pipe must keep being drained
            h[1].feed(b"more\n" * 1000)
            await asyncio.sleep(0)
        for _ in range(500):
            if not h[1].stdout._buffer:
                break
            await asyncio.sleep(0.01)
        drained.append(len(h[1].stdout._buffer))
        # the supervisor stops every rank (FakeRank.stop ends them)

    sup, s, out, err, rundir, _ = supervise(tmp_path, play)
    assert s.status == "failed" and s.exit_code == 1
    assert "cannot write" in s.reason and "rank-1.log" in s.reason and "No space left" in s.reason, s.reason
    assert drained == [0]


# ----------------------------------------------------------------------------- who is to blame


def test_the_rank_with_the_real_error_is_blamed_even_when_it_exits_last(tmp_path):
    async def play(h):
        h[1].stderr.feed_data(b"Traceback (most recent call last):\n"
                              b"RuntimeError: stopping: 1 other rank(s) failed to start (see their output)\n")
        h[1].end(ExitStatus(code=1, signal=None))
        await asyncio.sleep(1.0)  # well past the settle time
        h[0].stderr.feed_data(b"Traceback (most recent call last):\nRuntimeError: --resume /nonexistent: no such file\n")
        h[0].end(ExitStatus(code=1, signal=None))

    sup, s, *_ = supervise(tmp_path, play)
    assert s.failed_rank == 0, s.reason
    assert s.reason.startswith("rank 0 (localhost) exited with code 1") and "then rank 1 failed too" in s.reason


def test_ring_peer_loss_is_not_blamed_over_a_crash(tmp_path):
    async def play(h):
        h[0].stderr.feed_data(b"[ring] connection to a peer was lost\n")
        h[0].end(ExitStatus(code=1, signal=None))
        await asyncio.sleep(0.5)
        h[1].stderr.feed_data(b"ValueError: bad batch\n")
        h[1].end(ExitStatus(code=2, signal=None))

    sup, s, *_ = supervise(tmp_path, play)
    assert s.failed_rank == 1 and s.exit_code == 2, s.reason


def test_a_signal_ssh_cannot_name_is_numbered_from_the_guards_own_word(tmp_path):
    async def play(h):
        h[1].feed(ev("exited", 1, code=None, signal=5, token=h[1].token))
        await asyncio.sleep(0.05)
        h[1].end(ExitStatus(code=None, signal=99, signal_label="SIG@openssh.com"))

    sup, s, *_ = supervise(tmp_path, play)
    assert "killed by a signal reported as 'SIG@openssh.com' (signal 5 on localhost)" in s.reason, s.reason


@pytest.mark.parametrize("status, words, code", [
    (ExitStatus(code=None, signal=int(signal.SIGTRAP)), "was killed by SIGTRAP", 128 + signal.SIGTRAP),
    (ExitStatus(code=None, signal=77), "was killed by signal 77", 128 + 77),
    (ExitStatus(code=None, signal=99, signal_label="SIG@openssh.com"), "was killed by a signal reported as 'SIG@openssh.com'", 227),
])
def test_any_signal_gives_a_readable_reason(tmp_path, status, words, code):
    async def play(h):
        h[1].end(status)

    sup, s, *_ = supervise(tmp_path, play)
    assert s.failed_rank == 1 and words in s.reason and s.exit_code == code, s.reason


# ----------------------------------------------------------------------------- real ranks

HOSTILE = SCRIPTS / "hostile.py"


def _no_process_left(rd: Path, extra=()) -> None:
    import psutil

    assert not alive(rank_pids(rd) + list(extra), timeout=5), "a rank or its child outlived the run"
    left = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            env = p.info["environ"] or {}
        except psutil.Error:
            continue
        if env.get("ORCH_RUN_DIR") == str(rd) and p.status() != psutil.STATUS_ZOMBIE:
            left.append((p.pid, p.info["cmdline"]))
    assert not left, f"processes of the run left behind: {left}"


@pytest.mark.slow
def test_closed_stdout_run_finishes_with_full_logs(tmp_path):
    rd = tmp_path / "run"
    p = start_orch("run", str(HOSTILE), "-n", "2", "--run-dir", str(rd), cwd=tmp_path,
                   env={"HOSTILE": "flood", "FLOOD_LINES": "20000"})
    try:
        for _ in range(3):  # what `| head -3` does
            p.stdout.readline()
        p.stdout.close()
        p.stdout = None
        _, err = p.communicate(timeout=120)
    finally:
        kill_tree(p.pid)
    assert p.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    s = summary(rd)
    assert s["status"] == "succeeded"
    for r in range(2):
        log = (rd / "logs" / f"rank-{r}.log").read_text()
        assert log.count("\n") >= 20000 and f"flood {r} 19999 " in log
    _no_process_left(rd)


@pytest.mark.slow
def test_multi_mib_lines_reach_the_log(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(HOSTILE), "-n", "2", "--run-dir", str(rd), cwd=tmp_path, env={"HOSTILE": "long"})
    assert r.returncode == 0, r.stderr
    log = (rd / "logs" / "rank-1.log").read_text()
    assert "A" * (3 * 1024 * 1024) + " long 1 done" in log
    assert re.search(r"^\[1\] A+ … \[cut: 3\.\d+ MiB, full line in logs/rank-1\.log\]$", r.stdout, re.M)
    bar = (rd / "logs" / "rank-0.log").read_bytes()  # bytes: read_text() would turn each \r into a newline
    assert bar == b"".join(b"\rbar 0 %d" % i for i in range(5000)) + b"\n"
    assert summary(rd)["status"] == "succeeded"
    _no_process_left(rd)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pid1", "sleeper"])
def test_forged_spawned_lines_cannot_make_orch_kill_anything(tmp_path, target):
    """The rank prints `spawned` for pid 1 or for a process the test started, then ignores SIGTERM and hangs:
    orch must SIGKILL only the rank's own groups, and the forged pid must survive."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        rd = tmp_path / "run"
        pid = 1 if target == "pid1" else victim.pid
        r = run_orch("run", str(HOSTILE), "-n", "2", "--run-dir", str(rd), "--grace", "3", cwd=tmp_path,
                     env={"HOSTILE": "forge", "FORGE_PID": str(pid)}, timeout=120)
        assert r.returncode == 3, r.stderr
        assert victim.poll() is None, "orch killed a process the rank named"
        s = summary(rd)
        assert s["failed_rank"] == 1 and s["ranks"][1]["pid"] not in (1, victim.pid)
        kinds = [e["kind"] for e in events(rd)]
        assert kinds.count("forged:spawned") == 4 and kinds.count("forged:exited") == 2 and kinds.count("spawned") == 2
        assert "token" not in (rd / "events.jsonl").read_text()
        _no_process_left(rd)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.slow
def test_a_rank_ignoring_sigterm_is_killed(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(HOSTILE), "-n", "2", "--run-dir", str(rd), cwd=tmp_path,
                 env={"HOSTILE": "stubborn"}, timeout=120)
    assert r.returncode == 3, r.stderr
    s = summary(rd)
    assert s["failed_rank"] == 1 and s["ranks"][0]["signal"] == signal.SIGKILL
    _no_process_left(rd)


@pytest.mark.slow
def test_sigtrap_is_named(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(HOSTILE), "-n", "2", "--run-dir", str(rd), cwd=tmp_path, env={"HOSTILE": "trap"})
    assert r.returncode == 128 + signal.SIGTRAP, r.stderr
    s = summary(rd)
    assert s["failed_rank"] == 1 and "killed by SIGTRAP" in s["reason"] and s["ranks"][1]["signal"] == signal.SIGTRAP
    _no_process_left(rd)


@pytest.mark.slow
def test_a_setsid_daemon_does_not_outlive_the_run(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(HOSTILE), "-n", "2", "--run-dir", str(rd), cwd=tmp_path, env={"HOSTILE": "daemon"})
    assert r.returncode == 0, r.stderr
    daemons = [int(m) for m in re.findall(r"daemon (\d+)", r.stdout)]
    assert len(daemons) == 2
    try:
        assert summary(rd)["status"] == "succeeded"
        assert not alive(daemons, timeout=5), "a setsid daemon outlived the run"
        _no_process_left(rd)
    finally:
        for d in daemons:
            try:
                os.kill(d, signal.SIGKILL)
            except ProcessLookupError:
                pass
