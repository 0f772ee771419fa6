"""The local fault matrix: what happens when a rank or the controller dies, hangs or is interrupted."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from orchestrator.runtime import checkpoint as ckpt
from tests.orch_helpers import SCRIPTS, alive, events, kill_tree, rank_pids, run_orch, start_orch, summary
from tests.runtime_helpers import latest_checkpoint, load_arrays, max_abs_diff

pytestmark = pytest.mark.slow

CRASH = SCRIPTS / "crash_once.py"
SMALL = ["--samples", "512", "--hidden", "16", "--optimizer", "adam", "--lr", "1e-2", "--batch-size", "8"]


def wait_for_step(run_dir: Path, step: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "events.jsonl").exists():
            ev = events(run_dir)
            if any(e["kind"] == "step" and e["step"] >= step for e in ev):
                return ev
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_sigkill_of_a_rank_mid_training_stops_the_run_fast(tmp_path):
    rd = tmp_path / "run"
    p = start_orch("run", str(CRASH), "-n", "3", "--run-dir", str(rd), "--", *SMALL, "--steps", "100000",
                   cwd=tmp_path, env={"CRASH_AT": "-1"})
    try:
        ev = wait_for_step(rd, 5)
        pids = {e["rank"]: e["pid"] for e in ev if e["kind"] == "spawned"}
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        p.communicate(timeout=30)
        elapsed = time.monotonic() - t0
        assert p.returncode == 128 + signal.SIGKILL
        assert elapsed < 10, f"run took {elapsed:.1f}s to end after the kill"  # README records the typical value
        s = summary(rd)
        assert s["failed_rank"] == 1 and "SIGKILL" in s["reason"]
        assert not alive(list(pids.values()), timeout=3)
    finally:
        kill_tree(p.pid)


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_restart_after_a_failure_ends_where_an_uninterrupted_run_ends(tmp_path, how):
    straight = tmp_path / "straight"
    r = run_orch("run", str(CRASH), "-n", "2", "--run-dir", str(straight), "--", *SMALL, "--steps", "20",
                 cwd=tmp_path, env={"CRASH_AT": "-1"})
    assert r.returncode == 0, r.stderr
    rd = tmp_path / "restarted"
    r = run_orch("run", str(CRASH), "-n", "2", "--run-dir", str(rd), "--max-restarts", "2", "--restart-backoff", "0.1",
                 "--", *SMALL, "--steps", "20", "--checkpoint-every", "5",
                 cwd=tmp_path, env={"CRASH_AT": "12", "CRASH_RANK": "1", "CRASH_HOW": how})
    assert r.returncode == 0, r.stderr
    s = summary(rd)
    assert s["status"] == "succeeded" and s["restarts"] == 1
    # One last line for the run, over both attempts; the first attempt's end is not dressed as the run's.
    ends = [l for l in r.stderr.splitlines() if "; run directory " in l]
    assert ends == [f"orch: succeeded after 2 attempts in {s['duration_s']:.2f}s; run directory {rd}"], r.stderr
    first, second = s["attempts"]
    assert first["status"] == "failed" and first["failed_rank"] == 1 and second["resumed"]
    if how == "raise":
        assert first["exit_code"] == 1
    assert (rd / "logs" / "attempt-1" / "rank-0.log").exists() and (rd / "logs" / "rank-0.log").exists()
    assert any(e["kind"] == "step" and e["attempt"] == 1 for e in events(rd))
    a, b = load_arrays(latest_checkpoint(straight)), load_arrays(latest_checkpoint(rd))
    assert max_abs_diff(a, b) == 0.0 and max_abs_diff(a, b, prefix="optimizer.") == 0.0


def test_exception_in_one_rank_while_others_wait_in_all_sum(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(CRASH), "-n", "3", "--run-dir", str(rd), "--", *SMALL, "--steps", "50",
                 cwd=tmp_path, env={"CRASH_AT": "7", "CRASH_RANK": "2", "CRASH_HOW": "raise"})
    assert r.returncode == 1
    s = summary(rd)
    assert s["failed_rank"] == 2, s["reason"]
    assert "RuntimeError: injected failure" in r.stderr.split("last lines of rank 2")[1]
    assert not alive(rank_pids(rd), timeout=3)


def test_a_stopped_rank_is_detected_as_a_hang_and_named(tmp_path):
    rd = tmp_path / "run"
    p = start_orch("run", str(CRASH), "-n", "3", "--run-dir", str(rd), "--hang-timeout", "2", "--",
                   *SMALL, "--steps", "100000", cwd=tmp_path, env={"CRASH_AT": "-1"})
    try:
        ev = wait_for_step(rd, 3)
        pids = {e["rank"]: e["pid"] for e in ev if e["kind"] == "spawned"}
        os.kill(pids[2], signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=60)
        assert p.returncode == 1
        assert time.monotonic() - t0 < 20
        assert "hang: no rank made progress for 2s" in err
        assert "rank 2 is stopped" in err and "waiting for rank 2" in err
        assert summary(rd)["failed_rank"] == 2
        assert not alive(list(pids.values()), timeout=3), "the stopped rank survived"
    finally:
        for pid in locals().get("pids", {}).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_tree(p.pid)


def test_controller_sigkill_mid_training_leaves_no_rank_and_a_loadable_checkpoint(tmp_path):
    rd = tmp_path / "run"
    p = start_orch("run", str(CRASH), "-n", "2", "--run-dir", str(rd), "--", *SMALL, "--steps", "100000",
                   "--checkpoint-every", "3", cwd=tmp_path, env={"CRASH_AT": "-1"})
    try:
        ev = wait_for_step(rd, 10)
        pids = [e["pid"] for e in ev if e["kind"] == "spawned"]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        assert not alive(pids, timeout=5)
        found = ckpt.latest_complete(rd / "checkpoints")  # what --resume would pick
        assert found is not None and found.step >= 3
        model, optimizer = ckpt.load(found)
        assert model and optimizer
    finally:
        kill_tree(p.pid)


def test_exclude_failed_host_restarts_with_a_smaller_world(tmp_path):
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"hosts": [{"ssh": name, "ips": ["127.0.0.1"]} for name in
                                        ("localhost", "127.0.0.1", "localhost.localdomain")]}))
    rd = tmp_path / "run"
    r = run_orch("run", str(CRASH), "--hostfile", str(hf), "--run-dir", str(rd), "--max-restarts", "3",
                 "--restart-backoff", "0.05", "--exclude-failed-host", "--", *SMALL, "--steps", "20", "--checkpoint-every", "5",
                 cwd=tmp_path, env={"CRASH_AT": "7", "CRASH_RANK": "2", "CRASH_HOW": "exit", "CRASH_ALWAYS": "1"})
    assert r.returncode == 0, r.stderr
    s = summary(rd)
    assert [a["status"] for a in s["attempts"]] == ["failed", "failed", "succeeded"]
    assert "excluding host localhost.localdomain" in s["attempts"][1]["note"] and "world size 3 -> 2" in r.stderr
    assert s["world_size"] == 2 and [x["steps"] for x in s["ranks"]] == [20, 20]
