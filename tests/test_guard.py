"""The rank guard on its own: it mirrors the rank's status and never lets it outlive its controller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.orch_helpers import ROOT, alive

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def guard(*argv: str, stdin=subprocess.PIPE, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-S", "-m", "orchestrator.runtime.guard", "--", *argv], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**ENV, **(extra_env or {})},
                            start_new_session=True, text=True)


def child_pids(p: subprocess.Popen, n: int, timeout: float = 10) -> list[int]:
    """The rank prints its pid (and its child's) on its first line."""
    line = p.stdout.readline()
    pids = [int(x) for x in line.split()]
    assert len(pids) == n, line
    return pids


SPAWN = "import os, subprocess, time; c = subprocess.Popen(['sleep', '300']); print(os.getpid(), c.pid, flush=True); time.sleep(300)"


def test_exit_code_is_mirrored_and_devnull_stdin_is_fine():
    p = guard(sys.executable, "-c", "import sys; sys.exit(7)", stdin=subprocess.DEVNULL)
    assert p.wait(timeout=30) == 7


def test_signal_death_is_mirrored():
    p = guard(sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert p.wait(timeout=30) == -signal.SIGKILL


def test_stdin_eof_stops_the_rank_and_its_children():
    p = guard(sys.executable, "-c", SPAWN)
    try:
        pids = child_pids(p, 2)
        t0 = time.monotonic()
        p.stdin.close()
        p.wait(timeout=10)
        assert not alive(pids, timeout=3)
        assert time.monotonic() - t0 < 5
    finally:
        p.kill()


def test_sigterm_to_the_guard_stops_the_group_even_a_stopped_rank():
    p = guard(sys.executable, "-c", SPAWN)
    try:
        pids = child_pids(p, 2)
        os.kill(pids[0], signal.SIGSTOP)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
        assert not alive(pids, timeout=3)
    finally:
        p.kill()


def test_no_stdin_mode_follows_the_parent():
    """With --no-stdin (under mpirun), the guard stops its rank when its parent dies."""
    code = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-S', '-m', 'orchestrator.runtime.guard', "
            "'--no-stdin', '--', sys.executable, '-c', %r]); time.sleep(300)" % SPAWN)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=ENV, text=True, start_new_session=True)
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        parent.kill()
        parent.wait(timeout=10)
        assert not alive(pids, timeout=5)
    finally:
        parent.kill()
