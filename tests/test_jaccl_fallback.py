"""--fallback-backend ring, end to end: a real `orch run` on a jaccl hostfile whose JACCL ranks fail to start.

MLX's Linux CPU build has no JACCL, so the JACCL attempt's ranks are stand-ins
(tests/scripts/jaccl_standin.py) that print what real JACCL ranks printed when
they failed (recorded outputs, tests/fixtures/stderr-jaccl/SOURCES.md) and exit 1.
Everything else is real: orch plans the jaccl job from the hostfile's rdma matrix,
hands each rank MLX_IBV_DEVICES / MLX_JACCL_COORDINATOR, supervises, diagnoses,
re-plans the same hosts on the ring and the second attempt trains the
mlp_regression recipe for real from the latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.orch_helpers import SCRIPTS, alive, events, rank_pids, run_orch, summary
from tests.runtime_helpers import latest_checkpoint, load_arrays, max_abs_diff

pytestmark = pytest.mark.slow

STANDIN = SCRIPTS / "jaccl_standin.py"
STDERR = Path(__file__).resolve().parent / "fixtures" / "stderr-jaccl"
# exo#1390: both ranks of a 2-Mac JACCL job, "Changing queue pair to RTR failed with errno 22" during init.
RTR_0 = STDERR / "exo_runner_rtr_errno22__macstudio_rank0__exo1390_partial.txt"
RTR_1 = STDERR / "exo_runner_rtr_errno22__macmini_rank1__exo1390_partial.txt"
# mlx#4192: a cable pulled mid-collective (not an init failure: no fallback).
CABLE = STDERR / "crash_sigsegv_tbt_post_recv_cable_unplug__2mac_tb__mlx4192.txt"
SMALL = ["--samples", "512", "--hidden", "16", "--optimizer", "adam", "--lr", "1e-2", "--batch-size", "8"]
# The matrix exo#1390's ranks were handed (shown in both recordings).
MATRIX = [[None, "rdma_en4"], ["rdma_en5", None]]


def jaccl_hostfile(tmp_path: Path) -> Path:
    """Two "hosts" on this machine with the recorded rdma matrix; the hostfile names jaccl."""
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"backend": "jaccl", "hosts": [
        {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": MATRIX[0]},
        {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": MATRIX[1]},
    ]}))
    return path


def test_jaccl_init_failure_restarts_on_the_ring_from_the_latest_checkpoint(tmp_path):
    hf = jaccl_hostfile(tmp_path)
    # The reference: 20 uninterrupted steps on the ring over the same hosts.
    straight = tmp_path / "straight"
    r = run_orch("run", str(STANDIN), "--hostfile", str(hf), "--backend", "ring", "--run-dir", str(straight),
                 "--", *SMALL, "--steps", "20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # A run that trained 10 steps and checkpointed; it is continued with the jaccl hostfile.
    rd = tmp_path / "run"
    r = run_orch("run", str(STANDIN), "--hostfile", str(hf), "--backend", "ring", "--run-dir", str(rd),
                 "--", *SMALL, "--steps", "10", "--checkpoint-every", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_orch("run", str(STANDIN), "--hostfile", str(hf), "--run-dir", str(rd), "--max-restarts", "1",
                 "--restart-backoff", "0.1", "--fallback-backend", "ring",
                 "--", *SMALL, "--steps", "20", "--checkpoint-every", "5",
                 cwd=tmp_path, env={"JACCL_STANDIN": "init_fail", "JACCL_STDERR_0": str(RTR_0), "JACCL_STDERR_1": str(RTR_1)})
    assert r.returncode == 0, r.stderr
    assert "restarting on the ring backend over the same hosts from the latest checkpoint" in r.stderr

    s = summary(rd)
    assert s["status"] == "succeeded" and s["backend"] == "ring" and s["restarts"] == 1
    first, second = s["attempts"]
    assert first["backend"] == "jaccl" and first["status"] == "failed"
    assert first["diagnosis_cause"] == "jaccl_queue_pair" and "RTR (errno 22)" in first["diagnosis"]
    assert first["note"].startswith("JACCL failed to start (jaccl: rank") and "ring backend" in first["note"]
    assert second["backend"] == "ring" and second["resumed"] and second["status"] == "succeeded"
    assert second["cause"] == first["diagnosis"]
    plan = json.loads((rd / "plan.json").read_text())
    assert plan["backend"] == "ring" and plan["backend_reason"].startswith("--fallback-backend ring: JACCL failed to start")

    # The JACCL attempt's ranks really got the JACCL contract (the recorded failure is in their logs) ...
    assert json.loads((rd / "mlx-ibv-devices.json").read_text()) == MATRIX
    assert "RTR failed with errno 22" in (rd / "logs" / "rank-1.log").read_text()
    # ... and the ring attempt resumed at step 11, not step 1.
    steps = sorted(e["step"] for e in events(rd) if e["kind"] == "step" and e["attempt"] == 1 and e["rank"] == 0)
    assert steps[0] == 11 and steps[-1] == 20
    a, b = load_arrays(latest_checkpoint(straight)), load_arrays(latest_checkpoint(rd))
    assert max_abs_diff(a, b) == 0.0 and max_abs_diff(a, b, prefix="optimizer.") == 0.0
    assert not alive(rank_pids(rd), timeout=3)


def test_without_a_checkpoint_the_fallback_starts_over_and_says_so(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(STANDIN), "--hostfile", str(jaccl_hostfile(tmp_path)), "--run-dir", str(rd),
                 "--max-restarts", "1", "--restart-backoff", "0.1", "--fallback-backend", "ring",
                 "--", *SMALL, "--steps", "5",
                 cwd=tmp_path, env={"JACCL_STDERR_0": str(RTR_0), "JACCL_STDERR_1": str(RTR_1)})
    assert r.returncode == 0, r.stderr
    assert "restarting on the ring backend over the same hosts from the start (no checkpoint yet)" in r.stderr, r.stderr
    s = summary(rd)
    assert [a["backend"] for a in s["attempts"]] == ["jaccl", "ring"] and not s["attempts"][1]["resumed"], s["attempts"]
    assert [x["steps"] for x in s["ranks"]] == [5, 5], (s["ranks"], r.stderr)


def test_a_jaccl_failure_after_init_restarts_on_jaccl_not_the_ring(tmp_path):
    """A cable pulled mid-collective is not a start-up failure: the restart stays on JACCL (and fails the same way)."""
    rd = tmp_path / "run"
    r = run_orch("run", str(STANDIN), "--hostfile", str(jaccl_hostfile(tmp_path)), "--run-dir", str(rd),
                 "--max-restarts", "1", "--restart-backoff", "0.1", "--fallback-backend", "ring",
                 cwd=tmp_path, env={"JACCL_STDERR_0": str(CABLE), "JACCL_STDERR_1": str(CABLE)})
    assert r.returncode == 1
    assert "restarting on the ring" not in r.stderr
    s = summary(rd)
    assert s["backend"] == "jaccl" and [a["backend"] for a in s["attempts"]] == ["jaccl", "jaccl"]
    assert {a["diagnosis_cause"] for a in s["attempts"]} == {"jaccl_link_lost"}
    assert all(a["note"] is None for a in s["attempts"])


@pytest.mark.parametrize("args, words", [
    (["--backend", "ring"], "only a jaccl or jaccl-ring run can fall back (this run uses ring)"),
    ([], "the fallback happens on a restart; add --max-restarts 1"),
])
def test_fallback_misuse_is_one_line_exit_2(tmp_path, args, words):
    r = run_orch("run", str(STANDIN), "--hostfile", str(jaccl_hostfile(tmp_path)), "--fallback-backend", "ring",
                 *args, cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
