"""The step-cadence watchdog: a deadlocked collective is caught in ~30 s, not --hang-timeout.

Unit tests drive ``Watchdog`` with explicit times (no sleeping); the integration tests run a real
deadlock (every rank spinning in MLX's ring, waiting for a peer that never sends), locally at 2 and
4 ranks and over SSH on namespace hosts, and a run whose evaluation lasts many step intervals.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from orchestrator.records import RankPhase
from orchestrator.watchdog import CADENCE_K, Watchdog
from tests.netns import make_cluster_fixture
from tests.orch_helpers import RECIPES, SCRIPTS, ring_hostfile, run_orch, summary
from tests.runtime_helpers import latest_checkpoint, load_arrays, max_abs_diff

DEADLOCK = SCRIPTS / "deadlock_once.py"
SMALL = ["--samples", "512", "--hidden", "16", "--optimizer", "adam", "--lr", "1e-2", "--batch-size", "8"]


@dataclass
class _Record:
    rank: int
    phase: RankPhase = RankPhase.TRAINING
    steps: Optional[int] = None
    last_step_wall: Optional[float] = None
    stopped: Optional[bool] = None
    pid: Optional[int] = None
    cpu_s: Optional[float] = None


@dataclass
class _State:
    rank: int
    record: _Record = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    handle: object = None
    tail: list = field(default_factory=list)

    def __post_init__(self):
        self.record = _Record(self.rank)


def watchdog(n=2, hang_timeout=300.0, floor=30.0) -> Watchdog:
    wd = Watchdog([_State(r) for r in range(n)], hang_timeout, 120.0, False, "local", hang_floor=floor)
    wd.trainer_started()
    return wd


def test_the_rule_waits_k_times_the_slowest_interval_and_at_least_the_floor():
    wd = watchdog()
    wd.step(0, now=100.0)
    assert wd.cadence_deadline() is None  # one step: no pace known yet, only the ceiling
    assert wd.hang_deadline() == pytest.approx(400.0)
    wd.step(0, now=101.0)
    wd.step(0, now=102.5)
    assert (wd.fastest, wd.slowest) == (1.0, 1.5)
    assert wd.hang_deadline() == pytest.approx(102.5 + 30.0)  # 10 x 1.5 s is under the floor
    wd.step(0, now=107.5)  # a 5 s interval: 10 x 5 = 50 s
    assert wd.hang_deadline() == pytest.approx(107.5 + CADENCE_K * 5.0)
    tight = watchdog(hang_timeout=40.0)
    tight.step(0, now=0.0)
    tight.step(0, now=5.0)
    assert tight.hang_deadline() == pytest.approx(45.0)  # --hang-timeout stays the ceiling


def test_intervals_are_per_rank_and_a_rank_that_reports_alone_is_enough():
    wd = watchdog(n=2)
    for t in (0.0, 2.0, 4.0):  # mlx-lm: rank 0 prints the rows, rank 1 never reports
        wd.step(0, now=t)
    wd.step(1, now=4.1)  # another rank's step right after is not an interval of 0.1 s... it is rank 1's first
    assert (wd.fastest, wd.slowest) == (2.0, 2.0)


def test_a_20s_step_run_with_a_60s_evaluation_is_never_stopped_by_the_rule():
    wd = watchdog(n=2)
    for t in (0.0, 20.0, 40.0):
        wd.step(0, now=t)
        wd.step(1, now=t)
    assert wd.hang_deadline() == pytest.approx(40.0 + 200.0)
    wd.phase_start(0, "eval")  # rank 0 evaluates; rank 1 waits in the next all_sum
    assert wd.cadence_deadline() is None and wd.hang_deadline() == pytest.approx(340.0)
    wd.phase_end(0, now=100.0)  # 60 s later
    assert wd.hang_deadline() == pytest.approx(100.0 + 200.0)
    wd.step(0, now=120.0)  # 80 s after the last step, but the interval spanned the phase: not learned
    wd.step(1, now=120.0)
    assert wd.slowest == 20.0
    # Even with a much shorter pace the evaluation never counts: a 1 s pace, a 60 s phase.
    fast = watchdog(n=1)
    for t in range(5):
        fast.step(0, now=float(t))
    fast.phase_start(0, "validation")
    assert fast.cadence_deadline() is None
    fast.phase_end(0, now=64.0)
    assert fast.hang_deadline() == pytest.approx(64.0 + 30.0)


def test_a_phase_of_a_rank_that_exited_does_not_pause_the_rule():
    wd = watchdog(n=2)
    for t in (0.0, 1.0, 2.0):
        wd.step(0, now=t)
    wd.phase_start(1, "checkpoint")
    assert wd.cadence_deadline() is None
    wd.states[1].exited.set()
    assert wd.cadence_deadline() == pytest.approx(2.0 + 30.0)


def test_the_diagnosis_names_the_rule_and_the_numbers():
    wd = watchdog(n=2, floor=30.0)
    import time as _time

    now = _time.monotonic()
    for i, t in enumerate((now - 45.0, now - 43.8, now - 41.8)):
        for s in wd.states:
            wd.step(s.rank, now=t)
            s.record.steps = i + 1
    _, reason = wd.hang()
    assert reason.startswith("hang: no step for 42s; steps came every 1.2–2.0s"), reason
    assert "--hang-floor 30s" in reason
    ceiling = watchdog(n=1, hang_timeout=30.0, floor=60.0)
    ceiling.step(0, now=now - 40.0)
    ceiling.step(0, now=now - 35.0)
    assert ceiling.hang()[1].startswith("hang: no rank made progress for 30s (--hang-timeout)")


# ----------------------------------------------------------------------------- a real deadlock


def assert_caught_by_the_cadence_rule(rd: Path, n: int) -> dict:
    s = summary(rd)
    assert s["status"] == "succeeded" and s["restarts"] == 1, s
    first, second = s["attempts"]
    reason = first["reason"]
    assert first["status"] == "failed" and reason.startswith("hang: no step for "), reason
    assert "steps came every" in reason and "--hang-floor" in reason, reason
    # Every rank answered with its Python stack, and it shows where it waits.
    for r in range(n):
        assert f"rank {r} is in wait_for_a_peer_that_never_sends at deadlock_once.py" in reason, reason
    assert second["resumed"], second
    return s


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_deadlocked_collective_is_caught_by_default_and_the_run_restarts_and_finishes(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(DEADLOCK), "-n", "2", "--run-dir", str(rd), "--max-restarts", "1",
                 "--restart-backoff", "0.1", "--", *SMALL, "--steps", "20", "--checkpoint-every", "4",
                 cwd=tmp_path, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    s = assert_caught_by_the_cadence_rule(rd, 2)
    # Caught by the default floor (30 s), not the 300 s ceiling: the first attempt's length says which.
    assert s["attempts"][0]["duration_s"] < 120, s["attempts"][0]
    straight = tmp_path / "straight"
    r = run_orch("run", str(DEADLOCK), "-n", "2", "--run-dir", str(straight), "--", *SMALL, "--steps", "20",
                 cwd=tmp_path, env={"DEADLOCK_AT": "-1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_arrays(latest_checkpoint(straight)), load_arrays(latest_checkpoint(rd))
    assert max_abs_diff(a, b) == 0.0  # restarted from the step-4 checkpoint, ends where an uninterrupted run ends


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_deadlock_at_4_ranks(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(DEADLOCK), "-n", "4", "--run-dir", str(rd), "--max-restarts", "1", "--hang-floor", "10",
                 "--restart-backoff", "0.1", "--", *SMALL, "--steps", "12", "--checkpoint-every", "4",
                 cwd=tmp_path, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_caught_by_the_cadence_rule(rd, 4)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_long_evaluation_is_not_a_hang(tmp_path):
    """Steps every ~0.3 s, one evaluation of 8 s (over 25 intervals, past --hang-floor 5): not stopped."""
    rd = tmp_path / "run"
    r = run_orch("run", str(SCRIPTS / "slow_eval.py"), "-n", "2", "--run-dir", str(rd), "--hang-floor", "5",
                 "--", "--steps", "12", "--eval-every", "6", "--checkpoint-every", "6",
                 cwd=tmp_path, timeout=200, env={"SLOW_EVAL_S": "8", "STEP_SLEEP_S": "0.3"})
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(rd)
    assert s["status"] == "succeeded" and all(x["steps"] == 12 for x in s["ranks"]), s


c4 = make_cluster_fixture(4, scope="module", name="c4")


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_deadlock_over_ssh_on_4_hosts(c4, tmp_path):
    hf = ring_hostfile(c4, tmp_path / "hosts.json")
    rd = tmp_path / "run"
    r = run_orch("run", str(DEADLOCK), "--hostfile", str(hf), "--ssh-config", c4.ssh_config_path,
                 "--known-hosts", c4.known_hosts_path, "--run-dir", str(rd), "--max-restarts", "1",
                 "--stage", str(RECIPES / "mlp_regression.py"), "--env", f"DEADLOCK_MARKER_DIR={tmp_path}",
                 "--hang-floor", "10", "--restart-backoff", "0.1", "--", *SMALL, "--steps", "12",
                 "--checkpoint-every", "4", cwd=tmp_path, timeout=250)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_caught_by_the_cadence_rule(rd, 4)


def test_the_pace_reads_in_the_unit_that_fits():
    from orchestrator.watchdog import _pace

    assert _pace(0.002, 0.0094) == "2–9ms" and _pace(1.2, 2.04) == "1.2–2.0s" and _pace(12.0, 31.6) == "12–32s"
