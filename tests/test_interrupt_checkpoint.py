"""Ctrl-C writes a final checkpoint before the ranks stop, when it can end within --grace.

The runtime takes orch's SIGTERM as a request to stop at the next step boundary
(runtime/stop_request.py): rank 0 writes a checkpoint there if it fits in what is left
of ``--grace``, and the run continues from it with ``--resume``. A step too long for the
grace gets no final checkpoint: the SIGKILL ends it and the last periodic one stays intact.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from orchestrator.runtime import checkpoint as ckpt
from orchestrator.runtime.stop_request import StopRequest
from tests.orch_helpers import RECIPES, SCRIPTS, finish, kill_tree, run_orch, start_orch
from tests.runtime_helpers import latest_checkpoint

SMALL = ["--samples", "512", "--hidden", "16", "--optimizer", "adam", "--lr", "1e-2", "--batch-size", "8"]


def test_the_estimate_uses_the_last_save_and_the_grace_left():
    stop = StopRequest(grace_s=1.0)
    assert not stop.pending and stop.time_left() == float("inf")
    stop._handler(signal.SIGTERM, None)
    t = stop.asked_at
    assert stop.final_checkpoint_fits(10_000_000, last_save_s=0.1, now=t + 0.2)  # 0.1 s <= 0.8 x 0.8 s
    assert not stop.final_checkpoint_fits(10_000_000, last_save_s=0.7, now=t + 0.2)
    assert not stop.final_checkpoint_fits(400_000_000, last_save_s=None, now=t)  # ~2 s at 200 MB/s
    assert StopRequest(grace_s=None).grace_s is None  # outside orch: nothing is armed


def steps_seen(rd: Path) -> list[int]:
    path = rd / "events.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if e.get("kind") == "step"]


def interrupt_after(p, rd: Path, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in steps_seen(rd)):
        assert p.poll() is None, finish(p, 10).stderr
        assert time.monotonic() < deadline, "no step seen"
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_ctrl_c_writes_a_final_checkpoint_and_resume_continues_from_it(tmp_path, ranks):
    rd = tmp_path / "run"
    p = start_orch("run", str(RECIPES / "mlp_regression.py"), "-n", str(ranks), "--run-dir", str(rd), "--grace", "5", "--",
                   *SMALL, "--steps", "100000", "--checkpoint-every", "1000000", cwd=tmp_path)
    interrupt_after(p, rd, 20)
    r = finish(p, 60)
    assert r.returncode == 130, r.stderr[-3000:]
    final = latest_checkpoint(rd)
    step = ckpt.validate(final).step
    assert step >= 20, step
    assert "final checkpoint written" in (rd / "logs" / "rank-0.log").read_text()

    r = run_orch("run", str(RECIPES / "mlp_regression.py"), "-n", str(ranks), "--run-dir", str(rd), "--",
                 *SMALL, "--steps", str(step + 5), "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"steps {step}->{step + 5}" in r.stdout, r.stdout[-2000:]  # trained on from the final checkpoint
    assert ckpt.validate(latest_checkpoint(rd)).step == step + 5


@pytest.mark.slow
def test_a_stop_that_reaches_one_rank_stops_every_rank_at_one_boundary_with_the_final_checkpoint(tmp_path):
    """The ranks' SIGTERMs come at their own moments (one guard each; over SSH ms apart). Here only rank 1
    gets one, ever: its flag rides the next all-reduce, every rank stops at that boundary, and rank 0 writes
    the final checkpoint. (Before, rank 1 ended a step later on its own and rank 0 failed in the next
    collective, with no checkpoint: the race behind a flaky Ctrl-C test under load.)"""
    rd = tmp_path / "run"
    p = start_orch("run", str(RECIPES / "mlp_regression.py"), "-n", "2", "--run-dir", str(rd), "--grace", "30", "--",
                   *SMALL, "--steps", "100000", "--checkpoint-every", "1000000", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not any(s >= 20 for s in steps_seen(rd)):
            assert p.poll() is None, finish(p, 10).stderr
            assert time.monotonic() < deadline, "no step seen"
            time.sleep(0.1)
        (rank1,) = [e["pid"] for e in map(json.loads, (rd / "events.jsonl").read_text().splitlines())
                    if e.get("kind") == "spawned" and e.get("from_rank") == 1]
        os.kill(rank1, signal.SIGTERM)  # rank 1's process alone: rank 0 and the guards hear nothing from us
        r = finish(p, 60)
    finally:
        kill_tree(p.pid)
    assert r.returncode != 0  # orch did not ask for this stop: a rank ended by SIGTERM is a failure
    step = ckpt.validate(latest_checkpoint(rd)).step
    assert step >= 20, step
    log0 = (rd / "logs" / "rank-0.log").read_text()
    assert f"stopping at step {step}: final checkpoint written" in log0, log0[-2000:]
    assert "Traceback" not in log0 + (rd / "logs" / "rank-1.log").read_text()


@pytest.mark.slow
def test_a_step_longer_than_the_grace_gets_no_final_checkpoint_and_the_last_stays_intact(tmp_path):
    rd = tmp_path / "run"
    p = start_orch("run", str(SCRIPTS / "slow_eval.py"), "-n", "2", "--run-dir", str(rd), "--grace", "0.5", "--",
                   "--steps", "1000", "--checkpoint-every", "2", cwd=tmp_path,
                   env={"STEP_SLEEP_S": "3", "SLOW_EVAL_S": "0"})
    interrupt_after(p, rd, 3)
    r = finish(p, 60)
    assert r.returncode == 130, r.stderr[-3000:]
    last = ckpt.validate(latest_checkpoint(rd))
    assert last.step == 2, last.step  # the periodic one: the boundary after step 3 came after the SIGKILL
    assert "final checkpoint written" not in (rd / "logs" / "rank-0.log").read_text()
