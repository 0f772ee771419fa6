"""mlx-lm under orch, for real: `orch run -n 2 -m mlx_lm -- lora ...` on a tiny local Llama (no network).

* It trains, summary.json has rank 0's steps and loss (read from mlx-lm's own
  report lines by programs.py), the adapters land in the run directory, and
  they are bit-identical to a 2-rank ``mlx.launch`` run of the same job.
* A rank stopped with SIGSTOP mid-training is caught by the hang watchdog:
  the diagnosis says the rank is stopped (its guard saw it; a stopped process
  cannot dump its stack) and quotes where the other rank is (its Python stack),
  the run fails within bounded time and no process of the run is left.

Kept cheap: the fixture is built once per module and the training job is 2
LoRA iterations of a 2-layer, 32-wide model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import pytest

from tests import mlxlm_fixture
from tests.orch_helpers import alive, end_stopped, events, finish, kill_tree, orch_argv, summary

pytestmark = pytest.mark.slow

ITERS = 2


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return mlxlm_fixture.build(tmp_path_factory.mktemp("mlxlm") / "fx")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "ORCH_"))}
    env.update(mlxlm_fixture.OFFLINE_ENV)
    return env


def _start(argv: list[str], cwd: Path, out: Path) -> subprocess.Popen:
    """A command with its output in files (nothing to drain), in its own session (cleaned up by pid)."""
    with open(out.with_suffix(".out"), "w") as so, open(out.with_suffix(".err"), "w") as se:
        return subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _wait_events(rd: Path, pred, proc: subprocess.Popen, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        ev = events(rd)
        if pred(ev):
            return ev
        if proc.poll() is not None:
            raise AssertionError(f"orch exited {proc.returncode} early; events: {[e['kind'] for e in ev]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s; events: {[e['kind'] for e in ev]}")
        time.sleep(0.1)


def test_orch_runs_mlx_lm_as_a_module_and_matches_mlx_launch(fx, tmp_path):
    from benchmarks.mlx_lm_lora import same_adapters

    rd = tmp_path / "run"
    orch = _start(orch_argv("run", "-n", "2", "--run-dir", str(rd), "-m", "mlx_lm", "--", "lora",
                            *fx.lora_args(rd / "adapters", iters=ITERS)), tmp_path, tmp_path / "orch")
    r = finish(orch, timeout=240)
    err = (tmp_path / "orch.err").read_text()
    assert r.returncode == 0, err[-3000:]
    s = summary(rd)
    assert s["status"] == "succeeded" and s["world_size"] == 2 and s["script"] == "mlx_lm"
    rank0, rank1 = s["ranks"]
    # From mlx-lm's own report lines (rank 0 prints them; rank 1 prints nothing).
    steps = [e for e in events(rd) if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, ITERS + 1)) and {e["from_rank"] for e in steps} == {0}
    assert rank0["steps"] == ITERS and rank0["last_loss"] == steps[-1]["loss"] and 0 < rank0["last_loss"] < 20
    assert rank1["steps"] is None
    assert (rd / "adapters" / "adapters.safetensors").is_file()
    # mlx-lm's validation passes are phases on every rank (the cadence watchdog waits for them).
    phases = {(e["from_rank"], e["name"]) for e in events(rd) if e["kind"] == "phase_start"}
    assert {(0, "validation"), (1, "validation")} <= phases, phases

    script = Path(sysconfig.get_path("scripts")) / "mlx_lm.lora"
    launcher = Path(sysconfig.get_path("scripts")) / "mlx.launch"
    assert script.is_file() and launcher.is_file(), "the test extra installs mlx-lm (and mlx)"
    ref = tmp_path / "mlx-launch-adapters"
    ml = _start([str(launcher), "-n", "2", "--", str(script), *fx.lora_args(ref, iters=ITERS)], tmp_path,
                tmp_path / "mlx-launch")
    m = finish(ml, timeout=240)
    ml_err = (tmp_path / "mlx-launch.err").read_text()
    # mlx.launch exits 0 even when a rank fails: its output must show no error either.
    assert m.returncode == 0 and "Traceback" not in ml_err, ml_err[-3000:]
    assert same_adapters(rd / "adapters", ref), "orch's adapters differ from mlx.launch's"


def test_a_sigstopped_mlx_lm_rank_is_caught_with_stacks_and_cleaned_up(fx, tmp_path):
    rd = tmp_path / "run"
    # Many iterations: the job is still training when the test stops rank 1 (it never ends by itself).
    orch = _start(orch_argv("run", "-n", "2", "--run-dir", str(rd), "--hang-timeout", "3", "-m", "mlx_lm", "--",
                            "lora", *fx.lora_args(rd / "adapters", iters=100000)), tmp_path, tmp_path / "orch")
    pids: list[int] = []
    try:
        ev = _wait_events(rd, lambda ev: any(e["kind"] == "step" for e in ev), orch, timeout=180)
        rank_pid = {e["rank"]: e["pid"] for e in ev if e["kind"] == "spawned"}
        pids = [p.pid for p in psutil.Process(orch.pid).children(recursive=True)]  # guards and ranks
        assert rank_pid[1] in pids and rank_pid[0] in pids
        os.kill(rank_pid[1], signal.SIGSTOP)
        r = finish(orch, timeout=90)
        err = (tmp_path / "orch.err").read_text()
        assert r.returncode == 1, err[-3000:]
        s = summary(rd)
        reason = s["reason"]
        assert s["status"] == "failed" and s["failed_rank"] == 1, reason
        assert reason.startswith("hang: no rank made progress for 3s (--hang-timeout)"), reason
        assert "rank 1 is stopped (SIGSTOP/SIGTSTP), not running" in reason, reason
        assert "rank 0 is in " in reason and " at trainer.py:" in reason, reason  # mlx-lm's training loop
        assert "rank 1 is in " not in reason, reason
        assert "waiting for rank 1" in reason, reason
        dumps = {e["rank"]: e for e in events(rd) if e["kind"] == "dump"}
        assert dumps[1]["stopped"] is True and dumps[1]["signalled"] is False
        assert dumps[0]["stopped"] is False and dumps[0]["signalled"] is True
        assert "most recent call first" in (rd / "logs" / "rank-0.log").read_text()
        assert not alive(pids, timeout=5), "a process of the run survived"
    finally:
        end_stopped(pids)
        kill_tree(orch.pid)
