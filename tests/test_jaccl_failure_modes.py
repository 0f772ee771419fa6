"""JACCL's failure modes under orch's supervision, with stand-in ranks (MLX's Linux build has no JACCL).

When a JACCL peer dies, survivors spin at 100% CPU and ignore SIGTERM (mlx#3910,
#4278); a cable pulled mid-collective segfaults (mlx#4192). The stand-ins
(tests/scripts/jaccl_standin.py) do exactly that: the survivor ignores SIGTERM and
busy-waits, the other rank replays a recorded crash (tests/fixtures/stderr-jaccl/)
and dies or freezes. orch must still name the rank that failed first, stop the
survivor with SIGKILL after --grace, leave no process behind, and, for a JACCL
plan only, warn that a SIGKILLed JACCL process may leave wired memory held.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from orchestrator.backends import jaccl
from tests.orch_helpers import SCRIPTS, alive, events, run_orch, summary
from tests.test_jaccl_fallback import CABLE, STDERR, jaccl_hostfile

pytestmark = pytest.mark.slow

STANDIN = SCRIPTS / "jaccl_standin.py"
# exo#2111's runner errors: the side channel's "[jaccl] Recv failed with errno=2" (one of two quoted lines).
RECV = STDERR / "exo_runner_errors_pd_alloc_recv_errno2__m3ultra_x4__exo2111_inline.txt"
GRACE = 4.0  # longer than the controller's own 3 s stop timeout: the survivor must still get all of it


def recv_line(tmp_path: Path) -> Path:
    """Only the recorded peer-loss line (the file's other line is a start-up failure of its own)."""
    lines = [line for line in RECV.read_text().splitlines() if "Recv failed" in line]
    assert lines == ["[jaccl] Recv failed with errno=2"]
    path = tmp_path / "recv.txt"
    path.write_text(lines[0] + "\n")
    return path


def pids_of(run_dir: Path) -> list[int]:
    """Every rank process and every spinning survivor, from the run's own records."""
    pids = [e["pid"] for e in events(run_dir) if e["kind"] == "spawned"]
    pids += [int(p.read_text()) for p in run_dir.glob("spinning-*")]
    return pids


def exited_at(run_dir: Path) -> dict[int, float]:
    return {e["from_rank"]: e["recv_t"] for e in events(run_dir) if e["kind"] == "exited"}


def run_standin(tmp_path: Path, run_dir: Path, *args: str, env: dict) -> "subprocess.CompletedProcess":  # noqa: F821
    return run_orch("run", str(STANDIN), "--hostfile", str(jaccl_hostfile(tmp_path)), "--run-dir", str(run_dir),
                    "--grace", str(GRACE), *args, cwd=tmp_path, timeout=90,
                    env={"JACCL_STANDIN": "peer_loss", "JACCL_DIE_RANK": "1", **env})


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-stderr", "silent"])
def test_a_dead_peer_is_named_and_the_spinning_survivor_is_sigkilled_after_the_grace(tmp_path, recorded):
    rd = tmp_path / "run"
    env = {"JACCL_DIE_HOW": "segv"}
    if recorded:  # the cable-pull crash on rank 1, the side channel's loss on rank 0
        env.update(JACCL_DIE_STDERR=str(CABLE), JACCL_SPIN_STDERR=str(recv_line(tmp_path)))
    try:
        r = run_standin(tmp_path, rd, env=env)
        assert r.returncode == 128 + signal.SIGSEGV, r.stderr
        s = summary(rd)
        assert s["failed_rank"] == 1 and s["reason"].startswith("rank 1 (127.0.0.1) was killed by SIGSEGV")
        # Either way the cause is JACCL's link, never "RDMA not enabled": rank 1 had trained a step.
        assert s["diagnosis_cause"] == ("jaccl_link_lost" if recorded else "jaccl_segfault"), s["diagnosis"]
        ranks = {x["rank"]: x for x in s["ranks"]}
        assert ranks[0]["signal"] == signal.SIGKILL and ranks[1]["signal"] == signal.SIGSEGV
        assert s["warnings"] == [f"{jaccl.SIGKILL_WARNING} (rank 0 on 127.0.0.1)"]
        assert "orch: warning: a JACCL rank was SIGKILLed" in r.stderr
        if recorded:
            assert "[jaccl] Recv failed with errno=2" in (rd / "logs" / "rank-0.log").read_text()
        # SIGTERM did not stop the survivor; SIGKILL came no sooner than --grace after the peer died.
        t = exited_at(rd)
        assert t[0] - t[1] >= GRACE
    finally:
        left = alive(pids_of(rd) if (rd / "events.jsonl").exists() else [], timeout=5)
    assert not left, f"still running: {left}"


def test_a_frozen_peer_fires_the_hang_watchdog_and_the_survivor_is_sigkilled(tmp_path):
    """A peer that stops answering without dying (a host that vanished): no exit to react to, only the watchdog."""
    rd = tmp_path / "run"
    try:
        r = run_standin(tmp_path, rd, "--hang-timeout", "2",
                        env={"JACCL_DIE_HOW": "stop", "JACCL_SPIN_STDERR": str(recv_line(tmp_path))})
        assert r.returncode == 1, r.stderr
        s = summary(rd)
        assert s["reason"].startswith("hang: no rank made progress for 2s") and s["failed_rank"] == 1
        assert "rank 1 is stopped" in s["reason"] and "waiting for rank 1" in s["reason"]
        ranks = {x["rank"]: x for x in s["ranks"]}
        assert ranks[0]["signal"] == signal.SIGKILL  # the spinning survivor ignored SIGTERM
        assert ranks[1]["signal"] == signal.SIGTERM  # the frozen one was woken (SIGCONT) and obeyed
        assert s["warnings"] == [f"{jaccl.SIGKILL_WARNING} (rank 0 on 127.0.0.1)"]
    finally:
        left = alive(pids_of(rd) if (rd / "events.jsonl").exists() else [], timeout=5)
    assert not left, f"still running: {left}"


def test_the_wired_memory_warning_is_for_jaccl_plans_only(tmp_path):
    """The same spinning survivor on a ring plan is SIGKILLed too, but a ring rank holds no RDMA memory."""
    rd = tmp_path / "run"
    try:
        r = run_standin(tmp_path, rd, "--backend", "ring", env={"JACCL_DIE_HOW": "segv", "JACCL_STANDIN_ALWAYS": "1"})
        assert r.returncode == 128 + signal.SIGSEGV, r.stderr
        s = summary(rd)
        assert s["backend"] == "ring" and s["failed_rank"] == 1
        assert {x["rank"]: x["signal"] for x in s["ranks"]} == {0: signal.SIGKILL, 1: signal.SIGSEGV}
        assert s["warnings"] == [] and "orch: warning" not in r.stderr
        assert s["diagnosis_cause"] is None  # a bare segfault on the ring is not called a JACCL problem
    finally:
        left = alive(pids_of(rd) if (rd / "events.jsonl").exists() else [], timeout=5)
    assert not left, f"still running: {left}"
