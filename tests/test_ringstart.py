"""The ring start in one place: the controller's policy (orchestrator/ringstart.py) and the
rank's half (orchestrator/runtime/ringstart.py), and the control channel launchers expose.

Unit tests with small fakes; the real gate and hold are exercised end to end by
test_guard_watch.py, test_local_run.py and benchmarks/launch_latency.py.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import protocol
from orchestrator.plan import ringstart
from orchestrator.hostfile import local_hostfile
from orchestrator.launch.base import ControlChannel, RankHandle
from orchestrator.plan import plan_job

ROOT = Path(__file__).resolve().parent.parent


def test_roles_gate_the_last_rank_and_hold_the_first_on_a_ring_only():
    assert ringstart.roles("ring", 4) == ({3}, {0})
    assert ringstart.roles("ring", 1) == (set(), set())
    for backend in ("mpi", "jaccl", "jaccl-ring", "nccl"):
        assert ringstart.roles(backend, 4) == (set(), set())


def test_the_plan_records_the_roles_and_rank_env_hands_them_to_the_guard():
    plan = plan_job(local_hostfile(3), "ring")
    assert [(r.gated, r.held) for r in plan.ranks] == [(False, True), (False, False), (True, False)]
    envs = [ringstart.rank_env(plan.backend, r) for r in plan.ranks]
    assert envs[0] == {protocol.ENV_HOLD: "1", protocol.ENV_LISTEN: plan.ranks[0].listen[0]}
    assert envs[1] == {protocol.ENV_LISTEN: plan.ranks[1].listen[0]}
    assert envs[2] == {protocol.ENV_GATED: "1", protocol.ENV_LISTEN: plan.ranks[2].listen[0]}
    assert ringstart.rank_env("mpi", plan_job(local_hostfile(2), "mpi").ranks[0]) == {}


def test_go_once_every_other_rank_listens_and_release_once_the_gated_one_does():
    rs = ringstart.RingStart.for_plan(plan_job(local_hostfile(3), "ring"))
    assert rs.listening(1) == []
    assert rs.listening(0) == [(2, protocol.CONTROL_GO)]  # 0 and 1 listen: 2 may connect
    assert rs.listening(0) == []  # each line once
    assert rs.listening(2) == [(0, protocol.CONTROL_RELEASE)]
    assert rs.gone(1) == [] and rs.listening(2) == []


def test_a_rank_that_is_gone_never_holds_the_others_back():
    rs = ringstart.RingStart([1], [0], 2)
    assert rs.gone(1) == [(0, protocol.CONTROL_RELEASE)]  # the gated rank died: the held one runs on
    assert rs.listening(0) == [(1, protocol.CONTROL_GO)]
    rs = ringstart.RingStart([2], [0], 3)
    assert rs.gone(0) == [] and rs.gone(1) == [(2, protocol.CONTROL_GO)]


def test_release_comes_before_go_when_both_are_due_at_once():
    rs = ringstart.RingStart([1], [0], 2)
    assert rs.listening(1) == [(0, protocol.CONTROL_RELEASE)]
    rs = ringstart.RingStart([1], [0], 2)
    rs._settled.add(1)  # the gated rank listened before anything was asked (a late event)
    assert rs.listening(0) == [(0, protocol.CONTROL_RELEASE), (1, protocol.CONTROL_GO)]


def test_no_roles_no_lines():
    rs = ringstart.RingStart([], [], 4)
    assert all(rs.listening(r) == [] for r in range(4)) and rs.gone(0) == []


def test_rank_handles_have_no_generic_send_only_a_typed_control_channel():
    from orchestrator.launch.local import LocalRank, PrestartedRank
    from orchestrator.launch.mpi import MPIRank

    assert not hasattr(RankHandle, "send")
    assert issubclass(LocalRank, ControlChannel) and issubclass(PrestartedRank, ControlChannel)
    assert not issubclass(MPIRank, ControlChannel)  # under mpirun a guard has no channel: no gate, no dump
    assert MPIRank.forward_stdin is not RankHandle.forward_stdin  # its input goes through mpirun
    ssh = (ROOT / "orchestrator" / "launch" / "ssh.py").read_text()
    assert re.search(r"class SSHRank\(RankHandle, ControlChannel\)", ssh)


def test_every_orch_variable_is_named_in_protocol_only():
    """No ``"ORCH_..."`` string literal outside protocol.py: each name has one home."""
    offenders = []
    for path in (ROOT / "orchestrator").rglob("*.py"):
        if path.name == "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"ORCH_[A-Z0-9_]+", node.value):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert offenders == []


def test_the_rank_side_is_stdlib_only_and_imports_under_dash_s():
    """The guard imports runtime/ringstart.py (and its other stdlib-only siblings) under ``python -S``, like protocol."""
    code = ("import sys; from orchestrator.runtime import guard; "
            "mine = {'orchestrator.runtime.' + m for m in ('ringstart', 'proctree', 'rank_sampling', 'control_channel')}; "
            "assert mine <= set(sys.modules), mine - set(sys.modules); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pydantic', 'mlx', 'psutil', 'asyncssh')]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_wait_gate_returns_when_the_guard_writes_the_gate_line(monkeypatch):
    from orchestrator.runtime import ringstart as rank_side

    r, w = os.pipe()
    os.write(w, protocol.GATE_LINE)
    monkeypatch.setenv(protocol.ENV_GATE_FD, str(r))
    rank_side.wait_gate(timeout_s=30)  # returns at once: the line is there
    assert protocol.ENV_GATE_FD not in os.environ
    with pytest.raises(OSError):
        os.fstat(r)  # the rank closed its end
    os.close(w)


def test_signal_init_writes_the_init_byte_once(monkeypatch):
    from orchestrator.runtime import ringstart as rank_side

    r, w = os.pipe()
    monkeypatch.setenv(protocol.ENV_INIT_FD, str(w))
    rank_side.take_init_fd()
    assert protocol.ENV_INIT_FD not in os.environ  # the program does not inherit it
    rank_side.signal_init()
    rank_side.signal_init()  # a second call finds nothing to write
    assert os.read(r, 16) == protocol.INIT_BYTE
    assert os.read(r, 16) == b""  # closed
    os.close(r)
