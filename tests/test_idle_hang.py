"""Hangs in programs that report no steps, and ranks that are stopped.

A program that is not ours (or not yet training) gives the step watchdog
nothing to time. What is left to see from outside is output and CPU time: the
guard adds the CPU time of the rank's process tree (and whether the rank is
stopped) to its ``rss`` samples, and the supervisor declares a hang when, for
``--hang-timeout``, no rank printed anything and no rank's CPU time advanced.
A stopped process cannot dump its stack: its guard answers the dump request
with "stopped" and the diagnosis says so.

Three layers, each real where it matters:

* the guard (run as ``python -S``, Linux and the macOS branch forced) samples
  CPU time and the stopped state of a real rank, and answers ``dump``;
* the real ``Supervisor`` over fake ranks (the streams are written by the
  test): the watchdog's rules, one at a time;
* ``orch run -n 2`` on real scripts: a rank that blocks forever in a sleep is
  caught with both ranks' stacks, a SIGSTOPped one is named stopped, and one
  that computes silently for longer than the timeout is left alone.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator import protocol, watchdog
from orchestrator.hostfile import local_hostfile
from orchestrator.launch.base import ExitStatus, RankSpec
from orchestrator.plan import plan_job
from orchestrator.rundir import RunDir
from orchestrator.runtime import rank_sampling
from orchestrator.supervisor import Supervisor, SupervisorOptions
from tests.orch_helpers import SCRIPTS, alive, end_stopped, events, finish, kill_tree, orch_argv, run_orch, summary
from tests.test_guard_support import start_guard  # noqa: F401 (fixture)
from tests.test_hostile_ranks import FakeLauncher

# ----------------------------------------------------------------------------- the guard


@pytest.mark.parametrize("text, secs", [
    ("0:00.03", 0.03), ("123:45.67", 7425.67),          # macOS: M:SS.ss, minutes past 59
    ("00:00:01", 1.0), ("1-02:03:04", 93784.0),          # procps: [DD-]HH:MM:SS
    ("", None), ("x", None), ("1:-2", None), ("1:2:3:4", None), ("2-", None),
])
def test_ps_cpu_time_is_read_in_both_formats(text, secs):
    got = rank_sampling.parse_ps_time(text)
    assert got == pytest.approx(secs) if secs is not None else got is None


BUSY_THEN_SLEEP = (
    "import time\n"
    "end = time.process_time() + 1.2\n"
    "while time.process_time() < end:\n"
    "    pass\n"
    "print('busy done', flush=True)\n"
    "time.sleep(300)\n"
)


def _nth_event(g, kind: str, n: int, timeout: float = 60) -> dict:
    """The n-th (1-based) event of ``kind`` the guard wrote."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [e for e in g.events() if e["kind"] == kind]
        if len(seen) >= n:
            return seen[n - 1]
        if time.monotonic() > deadline:
            break
        g._read_some(0.5)
    raise AssertionError(f"no {kind} event #{n} within {timeout}s: {g.lines}")


@pytest.mark.parametrize("platform", [None, "darwin"])
def test_rss_samples_carry_cpu_time_and_the_stopped_state_and_dump_is_answered(start_guard, platform):
    g = start_guard(sys.executable, "-c", BUSY_THEN_SLEEP, platform=platform,
                    env={"ORCH_EVENTS": "1", "ORCH_GUARD_RSS": "1"})
    rank = g.wait_event("spawned")["pid"]
    g.pids.append(rank)
    g.wait_text("busy done")
    n = 1
    while True:  # every ~2 s; procps (the darwin branch run here) counts whole seconds
        sample = _nth_event(g, "rss", n)
        if sample["cpu_s"] >= 1.0:
            break
        n += 1
    assert sample["stopped"] is False and sample["cpu_s"] < 60

    os.kill(rank, signal.SIGSTOP)
    deadline = time.monotonic() + 10  # the stop lands asynchronously
    while not rank_sampling.is_stopped(rank) and time.monotonic() < deadline:
        time.sleep(0.01)
    g.send("dump\n")
    answer = _nth_event(g, "dump", 1)
    assert answer["stopped"] is True and answer["signalled"] is False
    while not sample["stopped"]:
        n += 1
        sample = _nth_event(g, "rss", n)

    os.kill(rank, signal.SIGCONT)
    g.send("dump\n")
    answer = _nth_event(g, "dump", 2)
    assert answer["stopped"] is False and answer["signalled"] is True
    g.proc.stdin.close()
    assert g.finish() == -signal.SIGTERM  # stopped by the guard on EOF: the rank's SIGTERM, mirrored
    assert not alive([rank], timeout=5)


def test_cpu_time_includes_children_waited_for_linux():
    """A shell loop of short commands advances too: on Linux a process's time includes its reaped children's."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    before = rank_sampling.cpu_seconds([os.getpid()])[os.getpid()]
    p = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()+0.5\nwhile time.process_time()<t: pass"])
    try:
        p.wait(timeout=60)
    finally:
        p.kill()
    after = rank_sampling.cpu_seconds([os.getpid()])[os.getpid()]
    assert after - before >= 0.45  # the child's 0.5 s (clock ticks are 10 ms)


# ----------------------------------------------------------------------------- the supervisor's rules (fake ranks)


def sample(rank: int, cpu_s, stopped=False, token=None) -> bytes:
    return protocol.encode("rss", rank, rss_bytes=1 << 20, tree_rss_bytes=1 << 20, system_available_bytes=None,
                           cpu_s=cpu_s, stopped=stopped, **({"token": token} if token else {})).encode()


@pytest.fixture(autouse=True)
def _short_stack_wait(monkeypatch):
    monkeypatch.setattr(watchdog, "STACK_WAIT_S", 0.3)  # fake ranks answer at once


def watch(tmp_path, play, n=2, hang_timeout=1.0):
    """Run the real Supervisor over fake ranks with a short --hang-timeout; ``play(handles)`` plays the ranks."""
    plan = plan_job(local_hostfile(n), "mpi")
    specs = [RankSpec(rank=r, host="localhost", script="s.py") for r in range(n)]
    rundir = RunDir(tmp_path / "run")
    launcher = FakeLauncher(tokens=True)

    async def go():
        sup = Supervisor(plan, specs, launcher, rundir, "s.py",
                         SupervisorOptions(handle_signals=False, echo=False, stop_timeout=2.0, hang_timeout=hang_timeout),
                         out=io.StringIO(), err=io.StringIO())
        task = asyncio.ensure_future(sup.run())
        while len(launcher.handles) < n:
            await asyncio.sleep(0.01)
        player = asyncio.ensure_future(play(launcher.handles))
        summary_ = await asyncio.wait_for(task, 60)
        player.cancel()
        await asyncio.gather(player, return_exceptions=True)
        return summary_

    result = asyncio.run(go())
    rundir.close()
    return result


def token(h) -> str:
    return h.token


async def steady(handles, cpu, every=0.2, rounds=10_000, step=0.0):
    """Each rank's guard samples every ``every`` s; CPU time grows by ``step`` per sample."""
    for i in range(rounds):
        for r, h in handles.items():
            h.feed(sample(r, cpu + i * step, token=token(h)))
        await asyncio.sleep(every)


def test_no_output_and_no_cpu_progress_is_a_hang(tmp_path):
    s = watch(tmp_path, lambda hs: steady(hs, 5.0))
    assert s.status == "failed" and s.reason.startswith(
        "hang: no rank printed anything or used CPU for 1s (--hang-timeout), and no rank reports steps"), s.reason


def test_cpu_that_advances_is_not_a_hang(tmp_path):
    async def play(hs):
        busy = asyncio.ensure_future(steady(hs, 5.0, step=0.2))  # a whole core
        await asyncio.sleep(2.5)  # well past --hang-timeout, silently
        busy.cancel()
        for h in hs.values():
            h.end(ExitStatus(code=0, signal=None))

    s = watch(tmp_path, play)
    assert s.status == "succeeded", s.reason


def test_cpu_creeping_under_the_threshold_is_still_idle(tmp_path):
    """A rank blocked in a poll loop burns a little CPU; under 2% of a core is not progress."""
    per_sample = watchdog.IDLE_CPU_RATE * 0.2 / 4
    s = watch(tmp_path, lambda hs: steady(hs, 5.0, step=per_sample))
    assert s.status == "failed" and s.reason.startswith("hang: no rank printed"), s.reason


def test_output_is_progress(tmp_path):
    async def play(hs):
        sampling = asyncio.ensure_future(steady(hs, 5.0))
        for i in range(12):  # 2.4 s of a line every 0.2 s, no CPU
            hs[1].feed(f"line {i}\n".encode())
            await asyncio.sleep(0.2)
        sampling.cancel()
        for h in hs.values():
            h.end(ExitStatus(code=0, signal=None))

    s = watch(tmp_path, play)
    assert s.status == "succeeded", s.reason


def test_not_armed_until_every_rank_has_a_cpu_sample(tmp_path):
    async def play(hs):
        for _ in range(12):  # rank 1's guard never samples (no CPU reading): idle cannot be told from busy
            hs[0].feed(sample(0, 5.0, token=token(hs[0])))
            await asyncio.sleep(0.2)
        for h in hs.values():
            h.end(ExitStatus(code=0, signal=None))

    s = watch(tmp_path, play)
    assert s.status == "succeeded", s.reason


def test_the_window_needs_a_sample_taken_after_it(tmp_path, monkeypatch):
    """The last sample showed progress and the next is late: no verdict until a reading covers the window."""
    monkeypatch.setattr(watchdog, "IDLE_SAMPLE_WAIT_S", 30.0)

    async def play(hs):
        for r, h in hs.items():
            h.feed(sample(r, 1.0, token=token(h)))
        await asyncio.sleep(0.2)
        for r, h in hs.items():
            h.feed(sample(r, 3.0, token=token(h)))  # progress
        await asyncio.sleep(2.0)  # window (1 s) over, no newer reading: the watchdog must wait
        for r, h in hs.items():
            h.feed(sample(r, 5.0, token=token(h)))  # it was busy all along
        await asyncio.sleep(0.2)
        for h in hs.values():
            h.end(ExitStatus(code=0, signal=None))

    s = watch(tmp_path, play)
    assert s.status == "succeeded", s.reason


def test_a_forged_sample_cannot_fake_progress(tmp_path):
    async def play(hs):
        guard_ = asyncio.ensure_future(steady(hs, 5.0))
        for i in range(60):  # the rank prints samples of its own, CPU racing ahead, without the token
            hs[1].feed(sample(1, 100.0 + i))
            await asyncio.sleep(0.1)
        guard_.cancel()

    s = watch(tmp_path, play)
    assert s.status == "failed" and s.reason.startswith("hang: no rank printed"), s.reason


def test_the_stopped_rank_is_named_from_its_guards_answer_and_the_other_quoted(tmp_path):
    """Any launcher (here a fake one, where the controller cannot look at the process): the guard's word counts."""
    async def play(hs):
        sampling = asyncio.ensure_future(steady(hs, 5.0))
        while not any(protocol.CONTROL_DUMP in h.sent for h in hs.values()):
            await asyncio.sleep(0.05)
        sampling.cancel()  # (a real guard's samples would say "stopped" too from now on)
        hs[1].feed(protocol.encode("dump", 1, signalled=False, stopped=True, token=token(hs[1])).encode())
        hs[0].feed(protocol.encode("dump", 0, signalled=True, stopped=False, token=token(hs[0])).encode())
        hs[0].feed(b"Current thread 0x00007f0000000001 (most recent call first):\n"
                   b'  File "/x/train.py", line 7 in wait_for_peer\n'
                   b'  File "/x/train.py", line 12 in main\n', "stderr")
        await asyncio.sleep(30)

    s = watch(tmp_path, play)
    assert s.status == "failed" and s.failed_rank == 1, s.reason
    assert "rank 1 is stopped (SIGSTOP/SIGTSTP), not running" in s.reason
    assert "rank 0 is in wait_for_peer at train.py:7 (from main at train.py:12)" in s.reason
    assert "the others may be waiting for rank 1" in s.reason


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_a_program_that_blocks_silently_is_caught_with_every_ranks_stack(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), "--hang-timeout", "3", str(SCRIPTS / "idle_forever.py"),
                 cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    s = summary(rd)
    assert s["status"] == "failed" and s["reason"].startswith(
        "hang: no rank printed anything or used CPU for 3s (--hang-timeout), and no rank reports steps"), s["reason"]
    for rank in (0, 1):
        assert f"rank {rank} is in idle_here at idle_forever.py:" in s["reason"], s["reason"]
        assert "idle_here" in (rd / "logs" / f"rank-{rank}.log").read_text()
    assert all(x["signal"] == signal.SIGTERM for x in s["ranks"]), s["ranks"]
    assert not alive([x["pid"] for x in s["ranks"]], timeout=5)


@pytest.mark.slow
def test_a_stopped_rank_of_a_silent_program_is_named_and_the_run_cleaned_up(tmp_path):
    import psutil

    rd = tmp_path / "run"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        p = subprocess.Popen(
            orch_argv("run", "-n", "2", "--run-dir", str(rd), "--hang-timeout", "3", str(SCRIPTS / "idle_forever.py")),
            cwd=tmp_path, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while "rank 1 joined" not in (tmp_path / "out").read_text():
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()[-3000:]
            time.sleep(0.1)
        rank1 = next(e["pid"] for e in events(rd) if e["kind"] == "spawned" and e["rank"] == 1)
        pids = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        assert rank1 in pids
        os.kill(rank1, signal.SIGSTOP)
        finish(p, timeout=90)
        assert p.returncode == 1, (tmp_path / "err").read_text()[-3000:]
        s = summary(rd)
        assert s["failed_rank"] == 1, s["reason"]
        assert "rank 1 is stopped (SIGSTOP/SIGTSTP), not running" in s["reason"], s["reason"]
        assert "rank 0 is in idle_here at idle_forever.py:" in s["reason"], s["reason"]
        assert "rank 1 is in" not in s["reason"], s["reason"]
        assert not alive(pids, timeout=5), "a process of the run survived"
    finally:
        end_stopped(pids)
        kill_tree(p.pid)


@pytest.mark.slow
def test_a_silent_program_that_is_not_python_is_caught_without_promising_stacks(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), "--hang-timeout", "3", "--", "sleep", "1000",
                 cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    reason = summary(rd)["reason"]
    assert reason.startswith("hang: no rank printed anything or used CPU for 3s"), reason
    assert "no rank answered with a Python stack" in reason and "Python stacks are in" not in reason, reason


@pytest.mark.slow
def test_a_program_that_computes_silently_past_the_timeout_is_not_stopped(tmp_path):
    """CPU time bounds the work (3 s of CPU is at least 3 s of wall time), so it always outlasts the 2 s timeout."""
    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--run-dir", str(rd), "--hang-timeout", "2", str(SCRIPTS / "busy_silent.py"),
                 cwd=tmp_path, env={"BUSY_CPU_S": "3"}, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(rd)["status"] == "succeeded"
    assert "[0] rank 0 done" in r.stdout and "[1] rank 1 done" in r.stdout
