"""The guard runs as `python -S`: every platform branch must need the standard library only. Each branch is run
for real on this machine (sys.platform forced; lsof and ps are real), against a real listening socket."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.test_guard_support import ENV, start_guard  # noqa: F401 (fixture)

PROBE = r"""
import json, os, socket, sys
sys.platform = PLATFORM
before = set(sys.modules)
from orchestrator.runtime import guard  # and with it every module it imports, on this branch
from orchestrator.runtime import control_channel, proctree, rank_sampling, ringstart
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(4); port = s.getsockname()[1]
pid = os.getpid()
result = {
    'listening': ringstart.is_listening(pid, port),
    'foreign_port_is_not_mine': ringstart.is_listening(pid, FOREIGN),
    'accepted_before': ringstart.has_accepted(pid, port),
    'stopped': rank_sampling.is_stopped(pid),
    'in_table': pid in proctree.process_table(),
    'rss': rank_sampling.rss_bytes([pid]).get(pid, 0),
    'available': rank_sampling.system_available_bytes(),
    'cpu_known': pid in rank_sampling.cpu_seconds([pid]),
    'sample': rank_sampling.sample(pid, set()),
    'subreaper': proctree.become_subreaper(),
    'pdeathsig': proctree.die_with_parent() is not None,
}
c = socket.create_connection(('127.0.0.1', port)); a, _ = s.accept()
result['accepted_after'] = ringstart.has_accepted(pid, port)
allowed = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
result['foreign_modules'] = sorted(m for m in set(sys.modules) - before
                                   if m.split('.')[0] not in allowed and m.split('.')[0] != 'orchestrator')
result['guard_modules'] = sorted(m for m in sys.modules if m.startswith('orchestrator.'))
print(json.dumps(result))
"""


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_every_branch_is_stdlib_only_and_sees_the_processes_own_socket(platform):
    with socket.socket() as foreign:  # listening, but in this (pytest) process, not in the probe
        foreign.bind(("127.0.0.1", 0))
        foreign.listen(1)
        code = PROBE.replace("PLATFORM", repr(platform)).replace("FOREIGN", str(foreign.getsockname()[1]))
        r = subprocess.run([sys.executable, "-S", "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["foreign_modules"] == []
    assert result["listening"] is True
    assert result["foreign_port_is_not_mine"] is False
    assert result["accepted_before"] is False and result["accepted_after"] is True
    assert result["stopped"] is False and result["in_table"] is True
    assert 1 << 20 < result["rss"] < 1 << 32
    if platform == "darwin":
        assert result["available"] is None  # no recorded vm_stat to parse yet: None, not a guess
    else:
        assert result["available"] > 0
    assert result["cpu_known"] is True
    sample = result["sample"]  # the rss event's fields: from /proc, or (darwin) from one ps
    assert sample["rss_bytes"] == sample["tree_rss_bytes"] and sample["stopped"] is False
    assert sample["cpu_s"] is not None and (sample["system_available_bytes"] is None) == (platform == "darwin")
    # Linux only: a subreaper and PR_SET_PDEATHSIG; the macOS branch snapshots the tree instead.
    assert result["subreaper"] is result["pdeathsig"] is (platform == "linux")
    assert {"orchestrator.runtime.proctree", "orchestrator.runtime.rank_sampling",
            "orchestrator.runtime.control_channel", "orchestrator.runtime.ringstart"} <= set(result["guard_modules"])


def test_psutil_is_not_importable_under_dash_s():
    """The premise: what the old macOS branch imported does not exist for `python -S`."""
    r = subprocess.run([sys.executable, "-S", "-c", "import psutil"], env=ENV, capture_output=True, timeout=60)
    assert r.returncode != 0


def test_bootstrap_and_guard_agree_on_the_init_variable():
    from orchestrator.runtime import bootstrap, guard

    assert bootstrap.ENV_INIT_FD == guard.ENV_INIT_FD


@pytest.mark.parametrize("platform", [None, "darwin"])
def test_rss_events_for_any_program(start_guard, platform):
    hog = "b = bytearray(200 * 2**20); print('ready', flush=True); import time; time.sleep(300)"
    g = start_guard(sys.executable, "-c", hog, flags=("--token-line",), platform=platform,
                    env={"ORCH_EVENTS": "1", "ORCH_GUARD_RSS": "1"})
    g.send("token abc123\n")
    g.wait_text("ready")
    deadline_events = []
    for _ in range(30):  # every ~2 s; the first ones may predate the allocation
        e = g.wait_line(lambda line: '"kind":"rss"' in line and line not in deadline_events, timeout=60)
        deadline_events.append(e)
        event = json.loads(e.split(" ", 1)[1])
        if event["rss_bytes"] > 200 * 2**20:
            break
    assert event["rss_bytes"] > 200 * 2**20
    assert event["tree_rss_bytes"] >= event["rss_bytes"]
    assert event["token"] == "abc123"
    assert (event["system_available_bytes"] is None) == (platform == "darwin")
    g.proc.stdin.close()
    g.finish()


def test_the_exited_event_carries_the_kernels_peak_of_a_program_too_short_to_sample(start_guard):
    """200 MiB held for a moment: the 2 s samples (the first one at spawn) cannot see it, the kernel's count can."""
    g = start_guard(sys.executable, "-c", "b = b'x' * (200 * 2**20)", env={"ORCH_EVENTS": "1", "ORCH_GUARD_RSS": "1"})
    assert g.finish() == 0
    (exited,) = [e for e in g.events() if e["kind"] == "exited"]
    assert exited["max_rss_bytes"] > 200 * 2**20, exited
    assert all(e["rss_bytes"] < 200 * 2**20 for e in g.events() if e["kind"] == "rss")


@pytest.mark.parametrize("platform, unit", [("linux", 1024), ("darwin", 1)])
def test_ru_maxrss_is_kib_on_linux_and_bytes_on_macos(monkeypatch, platform, unit):
    from orchestrator.runtime import rank_sampling

    monkeypatch.setattr(sys, "platform", platform)
    assert rank_sampling.maxrss_bytes(51200) == 51200 * unit


def test_no_rss_events_unless_asked(start_guard):
    g = start_guard(sys.executable, "-c", "import time; time.sleep(2.5)", env={"ORCH_EVENTS": "1"})
    assert g.finish() == 0
    assert {e["kind"] for e in g.events()} == {"spawned", "exited"}
