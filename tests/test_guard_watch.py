"""The listening watch and the hold, with real sockets: only from the rank's init on, only the rank's own socket,
with back-off, and a hold that never outlives its purpose. Both platform branches (macOS forced, real lsof/ps)."""

from __future__ import annotations

import socket
import sys
import time

import psutil
import pytest

from orchestrator import protocol
from tests.test_guard_support import start_guard  # noqa: F401 (fixture)

PY = sys.executable
BRANCHES = [None, "darwin"]

# A stand-in rank driven by its arguments: PORT STEP... (what MLX's ring does, in the order a test wants).
RANK = r"""
import os, select, socket, sys, time
port = int(sys.argv[1]); s = None; conns = []
for step in sys.argv[2:]:
    op, _, arg = step.partition(':')
    if op == 'listen':
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if arg == 'reuseport':
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(('127.0.0.1', port)); s.listen(8)
    elif op == 'init':
        fd = int(os.environ['ORCH_INIT_FD']); os.write(fd, b'i'); os.close(fd)
    elif op == 'gate':
        fd = int(os.environ['ORCH_GATE_FD']); select.select([fd], [], [], 60)
    elif op == 'accept':
        conns.append(s.accept()[0])
    elif op == 'sleep':
        time.sleep(float(arg))
    elif op == 'print':
        print(arg, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank(port: int, *steps: str) -> list[str]:
    return [PY, "-c", RANK, str(port), *steps]


def env_for(port: int, **extra) -> dict:
    return {"ORCH_EVENTS": "1", "ORCH_LISTEN": f"127.0.0.1:{port}", **extra}


def index_of(g, pred) -> int:
    return next(i for i, line in enumerate(g.lines) if pred(line))


def is_event(kind):
    return lambda line: (protocol.split_line(line)[1] or {}).get("kind") == kind


def rank_pid(g) -> int:
    pid = g.wait_event("spawned")["pid"]
    g.pids.append(pid)
    return pid


def stopped(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


@pytest.mark.parametrize("platform", BRANCHES)
def test_listening_is_reported_only_once_the_rank_begins_init(start_guard, platform):
    port = free_port()
    g = start_guard(*rank(port, "listen", "print:listening", "sleep:1.5", "print:initing", "init", "sleep:300"),
                    platform=platform, env=env_for(port))
    g.wait_event("listening")
    assert index_of(g, lambda line: line == "initing") < index_of(g, is_event("listening"))
    g.proc.stdin.close()
    g.finish()


@pytest.mark.parametrize("platform", BRANCHES)
def test_a_foreign_listener_on_the_port_is_not_the_rank(start_guard, platform):
    port = free_port()
    with socket.socket() as foreign:  # another process's socket on the rank's port
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        foreign.bind(("127.0.0.1", port))
        foreign.listen(1)
        g = start_guard(*rank(port, "init", "print:waiting", "sleep:1.5", "print:now", "listen:reuseport", "sleep:300"),
                        platform=platform, env=env_for(port))
        g.wait_event("listening")
        assert index_of(g, lambda line: line == "now") < index_of(g, is_event("listening"))
        g.proc.stdin.close()
        g.finish()


def _guard_cpu(g) -> float:
    t = psutil.Process(g.proc.pid).cpu_times()
    return t.user + t.system


@pytest.mark.parametrize("steps", [("listen",), ("init",)], ids=["never-inits", "inits-never-listens"])
def test_an_idle_watch_costs_almost_nothing(start_guard, steps):
    """Before init the guard does not look at all; after it, it backs off to 50 ms steps (was: 5 ms for 120 s)."""
    port = free_port()
    g = start_guard(*rank(port, *steps, "print:ready", "sleep:3", "print:slept", "sleep:300"), env=env_for(port))
    g.wait_text("ready")
    before = _guard_cpu(g)
    g.wait_text("slept")
    assert _guard_cpu(g) - before < 0.1
    if steps == ("listen",):
        assert not any(is_event("listening")(line) for line in g.lines)
    g.proc.stdin.close()
    g.finish()


@pytest.mark.parametrize("platform", BRANCHES)
def test_the_hold_stops_the_rank_in_accept_until_release(start_guard, platform):
    port = free_port()
    g = start_guard(*rank(port, "init", "listen", "accept", "print:accepted", "sleep:300"), platform=platform,
                    env=env_for(port, ORCH_HOLD="1", ORCH_HOLD_MAX_S="300"))
    pid = rank_pid(g)
    g.wait_event("listening")
    assert stopped(pid)
    with socket.create_connection(("127.0.0.1", port), timeout=30):  # the kernel completes it into the backlog
        time.sleep(0.5)
        assert stopped(pid)
        assert "accepted" not in g.lines
        g.send(protocol.CONTROL_RELEASE + "\n")
        g.wait_text("accepted")
    g.proc.stdin.close()
    g.finish()


@pytest.mark.parametrize("platform", BRANCHES)
def test_a_hold_that_would_come_after_accept_is_undone(start_guard, platform):
    """The rank accepted before its guard looked (its listener still open): holding it now would stall the ring."""
    port = free_port()
    g = start_guard(*rank(port, "listen", "print:listening", "accept", "init", "sleep:0.5", "print:alive"),
                    platform=platform, env=env_for(port, ORCH_HOLD="1", ORCH_HOLD_MAX_S="300"))
    g.wait_text("listening")
    with socket.create_connection(("127.0.0.1", port), timeout=30):
        assert g.finish(timeout=60) == 0
    assert "alive" in g.lines
    assert any(is_event("listening")(line) for line in g.lines)


def test_no_hold_once_release_came(start_guard):
    port = free_port()
    g = start_guard(*rank(port, "gate", "init", "listen", "sleep:0.5", "print:alive"),
                    env=env_for(port, ORCH_HOLD="1", ORCH_HOLD_MAX_S="300", ORCH_GATED="1"))
    g.send("release\ngo\n")  # in this order: the release is seen before the rank can listen
    assert g.finish(timeout=60) == 0
    assert "alive" in g.lines


def test_the_hold_is_bounded(start_guard):
    port = free_port()
    g = start_guard(*rank(port, "init", "listen", "print:listening", "accept", "print:accepted", "sleep:300"),
                    env=env_for(port, ORCH_HOLD="1", ORCH_HOLD_MAX_S="1"))
    g.wait_event("listening")
    with socket.create_connection(("127.0.0.1", port), timeout=30):
        g.wait_text("accepted")  # no release ever sent
    g.proc.stdin.close()
    g.finish()


def test_stopping_ends_a_held_rank(start_guard):
    port = free_port()
    g = start_guard(*rank(port, "init", "listen", "accept", "sleep:300"),
                    env=env_for(port, ORCH_HOLD="1", ORCH_HOLD_MAX_S="300"))
    pid = rank_pid(g)
    g.wait_event("listening")
    assert stopped(pid)
    g.proc.stdin.close()
    g.finish()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
