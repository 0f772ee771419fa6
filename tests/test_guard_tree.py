"""Nothing a rank started outlives its guard: setsid daemons, double forks, ranks that ignore SIGTERM, and a
guard whose own loop fails or that is SIGKILLed. Real processes; the macOS branch forced on Linux."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.orch_helpers import alive
from tests.test_guard_support import pids_line, start_guard  # noqa: F401 (fixture)

PY = sys.executable

# The rank starts a setsid daemon (its own session: no killpg reaches it) and a plain child, then waits.
DAEMON_RANK = (
    "import os, subprocess, sys, time\n"
    "d = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
    "c = subprocess.Popen(['sleep', '300'])\n"
    "print('pids', os.getpid(), d.pid, c.pid, flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)

# The classic daemon: a setsid child that forks the real daemon and exits, so the daemon is orphaned at once.
DOUBLE_FORK_RANK = (
    "import os, subprocess, sys, time\n"
    "r, w = os.pipe()\n"
    "code = 'import os, subprocess, sys; p = subprocess.Popen([\"sleep\", \"300\"]); os.write(int(sys.argv[1]), b\"%d\\\\n\" % p.pid)'\n"
    "subprocess.run([sys.executable, '-c', code, str(w)], start_new_session=True, pass_fds=(w,), check=True)\n"
    "os.close(w)\n"
    "daemon = int(os.read(r, 64))\n"
    "print('pids', os.getpid(), daemon, flush=True)\n"
    "sys.exit(3)\n"
)


@pytest.mark.parametrize("platform", [None, "darwin"])
def test_a_setsid_daemon_dies_when_the_guard_stops(start_guard, platform):
    g = start_guard(PY, "-c", DAEMON_RANK, "300", platform=platform)
    rank, daemon, child = pids_line(g, 3)
    g.proc.stdin.close()
    g.finish(timeout=60)
    assert not alive([rank, daemon, child], timeout=10)


def test_daemons_of_a_rank_that_exited_are_killed_linux(start_guard):
    """The rank exits on its own right after orphaning a daemon: the subreaper guard still owns it."""
    g = start_guard(PY, "-c", DOUBLE_FORK_RANK)
    rank, daemon = pids_line(g, 2)
    assert g.finish(timeout=60) == 3
    assert not alive([rank, daemon], timeout=10)


def test_a_setsid_daemon_of_a_rank_that_exited_is_killed(start_guard):
    g = start_guard(PY, "-c", DAEMON_RANK, "0")
    rank, daemon, child = pids_line(g, 3)
    assert g.finish(timeout=60) == 0
    assert not alive([rank, daemon, child], timeout=10)


@pytest.mark.parametrize("platform", [None, "darwin"])
def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace(start_guard, platform):
    rank_code = ("import os, signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                 "d = subprocess.Popen(['python3', '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'], start_new_session=True)\n"
                 "print('pids', os.getpid(), d.pid, flush=True); time.sleep(300)")
    g = start_guard(PY, "-c", rank_code, platform=platform, env={"ORCH_GRACE_S": "0.5"})
    rank, daemon = pids_line(g, 2)
    time.sleep(0.5)  # let the daemon install its handler (else TERM alone would end it: a weaker test)
    g.proc.stdin.close()
    assert g.finish(timeout=60) == -signal.SIGKILL  # the rank's own death, mirrored
    assert not alive([rank, daemon], timeout=10)


# The guard's loop fails (a bug, anything): its `finally` must still stop the whole group.
FAILING_GUARD = (
    "import sys\n"
    "from orchestrator.runtime import guard\n"
    "def boom(self):\n"
    "    raise RuntimeError('injected failure in the guard loop')\n"
    "guard.Guard.open_gate = boom\n"
    "sys.exit(guard.main(sys.argv[1:]))\n"
)


def test_an_exception_in_the_guard_loop_still_stops_the_group(start_guard):
    rank_code = ("import os, signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                 "c = subprocess.Popen(['sleep', '300'])\n"
                 "d = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                 "print('pids', os.getpid(), c.pid, d.pid, flush=True); time.sleep(300)")
    g = start_guard(PY, "-c", rank_code, wrapper=FAILING_GUARD, env={"ORCH_GATED": "1", "ORCH_GRACE_S": "0.3"})
    pids = pids_line(g, 3)
    g.send("go\n")  # -> open_gate -> RuntimeError inside the loop
    assert g.finish(timeout=60) != 0
    assert "injected failure" in g.stderr()
    assert not alive(pids, timeout=10)


def test_a_sigkilled_guard_takes_its_rank_with_it(start_guard):
    g = start_guard(PY, "-c", "import os, time; print('pids', os.getpid(), flush=True); time.sleep(300)")
    (rank,) = pids_line(g, 1)
    os.kill(g.proc.pid, signal.SIGKILL)
    g.proc.wait(timeout=30)
    assert not alive([rank], timeout=10)


def test_stop_signals_to_the_guard_stop_daemons_too(start_guard):
    g = start_guard(PY, "-c", DAEMON_RANK, "300")
    pids = pids_line(g, 3)
    g.proc.send_signal(signal.SIGHUP)
    g.finish(timeout=60)
    assert not alive(pids, timeout=10)


def test_a_guard_that_cannot_start_its_command_says_so(start_guard):
    g = start_guard("/nonexistent/command")
    assert g.finish(timeout=30) == 127
    assert "cannot start" in g.stderr()


def test_guard_processes_left_none_behind_in_the_subreaper_path():
    """Sanity for the test itself: a rank's orphan reparents to a subreaper guard, not to init."""
    code = ("import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import os, subprocess; d = subprocess.Popen([\"sleep\", \"300\"], start_new_session=True); print(\"pids\", d.pid, flush=True)'], stdout=subprocess.PIPE, text=True)\n"
            "print(p.stdout.readline().strip(), flush=True); p.wait()\n"
            "time.sleep(300)\n")
    env = {**os.environ, "PYTHONPATH": str(__import__("tests.orch_helpers").orch_helpers.ROOT)}
    g = subprocess.Popen([PY, "-S", "-m", "orchestrator.runtime.guard", "--", PY, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    daemon = None
    try:
        daemon = int(g.stdout.readline().split()[1])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the intermediate parent exits; the daemon moves to the guard
            with open(f"/proc/{daemon}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == g.pid:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("the orphaned daemon was not re-parented to the guard")
        g.stdin.close()
        g.wait(timeout=30)
        assert not alive([daemon], timeout=10)
    finally:
        for pid in (daemon, g.pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        g.wait(timeout=10)
