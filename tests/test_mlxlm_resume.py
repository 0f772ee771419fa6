"""Exact restarts of mlx-lm's LoRA trainer under orch (``orchestrator/integrations/mlx_lm_resume.py``), for real.

Unmodified ``mlx_lm.lora`` on 2 ranks, on the tiny local Llama fixture (no
network): 160 iterations, ``--save-every 40``, ``--seed 0``.

* Rank 1 is SIGKILLed once rank 0 reported iteration 100; ``--max-restarts 1``
  alone restarts the job, and the restart continues after the last save: its
  first training row is the iteration after it, summary.json's attempt note
  names that iteration and checkpoint, and the final adapters are
  bit-identical to the same run uninterrupted.
* Ctrl-C (SIGINT to orch) mid-run, then ``orch run --resume`` on the same run
  directory: the same, bit for bit.
* Over SSH (network-namespace hosts, real sshd): the checkpoint comes home with
  collection, goes back to rank 0's host with the restart, and the rank on the
  other host receives it from rank 0; bit-identical again.
* An mlx-lm version that was not verified keeps today's behaviour and says so
  in one line.

The three spellings of the program are spread over the tests: ``-m mlx_lm lora``
(the reference), the ``mlx_lm.lora`` console script, ``-m mlx_lm.lora``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests import mlxlm_fixture
from tests.orch_helpers import events, finish, kill_tree, orch_argv, summary

ITERS, SAVE_EVERY, KILL_AFTER = 160, 40, 100
SCRIPT = Path(sysconfig.get_path("scripts")) / "mlx_lm.lora"  # the console script itself (not a pyenv shim)


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "OMPI_", "ORCH_"))}
    env.update(mlxlm_fixture.OFFLINE_ENV)
    env.update(extra or {})
    return env


def _lora_args(fx, adapters: Path) -> list[str]:
    args = fx.lora_args(adapters, iters=ITERS)
    i = args.index("--steps-per-eval")
    args[i + 1] = str(SAVE_EVERY)  # a validation pass (numpy's RNG) between saves too
    return [*args, "--save-every", str(SAVE_EVERY)]


def _start(argv: list[str], cwd: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    """A command with its output in files (nothing to drain), in its own session (cleaned up by pid)."""
    with open(out.with_suffix(".out"), "w") as so, open(out.with_suffix(".err"), "w") as se:
        return subprocess.Popen(argv, cwd=cwd, env=_env(env), stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _wait_step(rd: Path, step: int, proc: subprocess.Popen, timeout: float) -> list[dict]:
    """Until rank 0 reported ``step`` (mlx-lm's own report line, as orch reads it); the events then."""
    deadline = time.monotonic() + timeout
    while True:
        ev = events(rd)
        if any(e["kind"] == "step" and e["step"] >= step for e in ev):
            return ev
        if proc.poll() is not None:
            raise AssertionError(f"orch exited {proc.returncode} before step {step}")
        if time.monotonic() > deadline:
            raise AssertionError(f"step {step} not reached within {timeout}s")
        time.sleep(0.02)


def _same(a: Path, b: Path) -> bool:
    from benchmarks.mlx_lm_lora import same_adapters

    return same_adapters(a, b)


def _saved_at(note: str, rd: Path) -> int:
    """The iteration an attempt note says it resumed from, checked against the checkpoint it names."""
    prefix = "resumed from iteration "
    assert note.startswith(prefix), note
    it = int(note[len(prefix):].split(" ", 1)[0])
    assert note == f"{prefix}{it} ({rd / 'checkpoints' / f'step-{it:08d}'})", note
    assert it % SAVE_EVERY == 0 and KILL_AFTER - SAVE_EVERY <= it < ITERS, note
    return it


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return mlxlm_fixture.build(tmp_path_factory.mktemp("mlxlm-resume") / "fx")


@pytest.fixture(scope="module")
def reference(fx, tmp_path_factory) -> Path:
    """The same job, uninterrupted: its adapters are what every restarted run must end with."""
    tmp = tmp_path_factory.mktemp("reference")
    rd = tmp / "run"
    p = _start(orch_argv("run", "-n", "2", "--run-dir", str(rd), "-m", "mlx_lm", "--", "lora",
                         *_lora_args(fx, rd / "adapters")), tmp, tmp / "orch")
    r = finish(p, timeout=400)
    assert r.returncode == 0, (tmp / "orch.err").read_text()[-3000:]
    saved = sorted(p.name for p in (rd / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == ["step-00000080", "step-00000120"], saved  # the last two of 40/80/120 are kept
    return rd / "adapters"




@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sigkilled_rank_restarts_from_the_last_save_bit_identically(fx, reference, tmp_path):
    assert SCRIPT.is_file(), "the test extra installs mlx-lm"
    rd = tmp_path / "run"
    orch = _start(orch_argv("run", "-n", "2", "--run-dir", str(rd), "--max-restarts", "1", "--restart-backoff", "0",
                            "--", str(SCRIPT), *_lora_args(fx, rd / "adapters")), tmp_path, tmp_path / "orch")
    try:
        ev = _wait_step(rd, KILL_AFTER, orch, timeout=400)
        rank1 = next(e["pid"] for e in ev if e["kind"] == "spawned" and e["rank"] == 1 and e["attempt"] == 0)
        os.kill(rank1, signal.SIGKILL)
        r = finish(orch, timeout=400)
    finally:
        kill_tree(orch.pid)
    err = (tmp_path / "orch.err").read_text()
    assert r.returncode == 0, err[-3000:]
    s = summary(rd)
    first, second = s["attempts"]
    assert first["status"] == "failed" and first["failed_rank"] == 1, first
    assert second["status"] == "succeeded" and second["resumed"] is True, second
    saved = _saved_at(second["note"], rd)
    steps = [e["step"] for e in events(rd) if e["kind"] == "step" and e["attempt"] == 1]
    assert steps == list(range(saved + 1, ITERS + 1)), steps[:5]  # the restart's first row is past the last save
    said = next(line for line in (rd / "logs" / "attempt-1" / "rank-0.log").read_text().splitlines()
                if "mlx-lm resumes at iteration" in line)
    assert f"resumes at iteration {saved + 1} from {rd / 'checkpoints'}" in said and "sent it" not in said, said
    assert _same(rd / "adapters", reference), "the restarted run's adapters differ from the uninterrupted run's"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_then_orch_run_resume_ends_bit_identically(fx, reference, tmp_path):
    rd = tmp_path / "run"
    argv = ["-n", "2", "--run-dir", str(rd), "-m", "mlx_lm.lora", "--", *_lora_args(fx, rd / "adapters")]
    orch = _start(orch_argv("run", *argv), tmp_path, tmp_path / "orch")
    try:
        _wait_step(rd, KILL_AFTER, orch, timeout=400)
        os.kill(orch.pid, signal.SIGINT)
        r = finish(orch, timeout=120)
    finally:
        kill_tree(orch.pid)
    assert r.returncode == 130, (tmp_path / "orch.err").read_text()[-3000:]
    assert summary(rd)["status"] == "interrupted"
    before = len(events(rd))
    again = _start(orch_argv("run", "--resume", *argv), tmp_path, tmp_path / "resume")
    try:
        r = finish(again, timeout=400)
    finally:
        kill_tree(again.pid)
    err = (tmp_path / "resume.err").read_text()
    assert r.returncode == 0, err[-3000:]
    s = summary(rd)
    assert s["status"] == "succeeded" and s["attempts"][0]["resumed"] is True
    saved = _saved_at(s["attempts"][0]["note"], rd)
    assert f"orch: --resume: resumed from iteration {saved} (" in err
    steps = [e["step"] for e in events(rd)[before:] if e["kind"] == "step"]
    assert steps == list(range(saved + 1, ITERS + 1)), steps[:5]
    assert _same(rd / "adapters", reference), "the resumed run's adapters differ from the uninterrupted run's"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_smaller_world_continues_and_says_what_is_not_exact(fx, reference, tmp_path):
    """Saved by 2 ranks, continued on 1 (as after --exclude-failed-host): it trains on, and says it is not exact."""
    import shutil

    rd = tmp_path / "run"
    rd.mkdir()
    shutil.copytree(reference.parent / "checkpoints", rd / "checkpoints")
    p = _start(orch_argv("run", "-n", "1", "--resume", "--run-dir", str(rd), "-m", "mlx_lm", "--", "lora",
                         *_lora_args(fx, rd / "adapters")), tmp_path, tmp_path / "orch")
    try:
        r = finish(p, timeout=400)
    finally:
        kill_tree(p.pid)
    assert r.returncode == 0, (tmp_path / "orch.err").read_text()[-3000:]
    said = next(line for line in (rd / "logs" / "rank-0.log").read_text().splitlines() if "mlx-lm resumes" in line)
    assert said.startswith("orch: mlx-lm resumes at iteration 121 from ") and said.endswith(
        "saved by 2 ranks, resumed on 1: iteration, optimizer, schedule and batch order continue, but not "
        "bit-identical (each batch is split over a different number of ranks, so gradients are summed in another "
        "order)"), said
    steps = [e["step"] for e in events(rd) if e["kind"] == "step"]
    assert steps == list(range(121, ITERS + 1)), steps[:5]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_checkpoint_that_does_not_fit_the_model_is_not_loaded(fx, reference, tmp_path):
    """Continued with LoRA on one layer instead of two: the saved adapters are not this model's; it says so."""
    import shutil

    rd = tmp_path / "run"
    rd.mkdir()
    shutil.copytree(reference.parent / "checkpoints", rd / "checkpoints")
    args = _lora_args(fx, rd / "adapters")
    args[args.index("--num-layers") + 1] = "1"
    p = _start(orch_argv("run", "-n", "2", "--resume", "--run-dir", str(rd), "-m", "mlx_lm", "--", "lora", *args),
               tmp_path, tmp_path / "orch")
    try:
        r = finish(p, timeout=400)
    finally:
        kill_tree(p.pid)
    assert r.returncode == 0, (tmp_path / "orch.err").read_text()[-3000:]
    log = (rd / "logs" / "rank-0.log").read_text()
    assert f"orch: --resume: {rd / 'checkpoints' / 'step-00000120'} does not fit this model (" in log, log[-2000:]
    assert "parameter names differ" in log and "training starts at iteration 1" in log
    steps = [e["step"] for e in events(rd) if e["kind"] == "step"]
    assert steps == list(range(1, ITERS + 1)), steps[:5]


# ----------------------------------------------------------------------------- no mlx-lm run needed


def test_the_three_spellings_of_the_lora_trainer_are_recognised():
    from orchestrator.integrations.mlx_lm_resume import is_lora

    assert is_lora("module", "mlx_lm", ["mlx_lm", "lora", "--train"])
    assert is_lora("module", "mlx_lm.lora", ["mlx_lm.lora", "--train"])
    assert is_lora("script", "/venv/bin/mlx_lm.lora", ["/venv/bin/mlx_lm.lora", "--train"])
    assert not is_lora("module", "mlx_lm", ["mlx_lm", "generate"])
    assert not is_lora("script", "/x/train.py", ["/x/train.py"])
    assert not is_lora("exec", "mlx_lm.lora", [])


def test_an_unverified_mlx_lm_version_runs_as_before_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from orchestrator.integrations import mlx_lm_resume

    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "RANK", "ORCH_MLX_LM_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORCH_RUN_DIR", str(tmp_path))
    argv = ["mlx_lm", "lora", "--train", "--resume"]
    assert mlx_lm_resume.install("module", "mlx_lm", argv, version="0.99.0") is False
    assert argv == ["mlx_lm", "lora", "--train"]  # orch's word is never left for mlx-lm's parser
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("orch: mlx-lm 0.99.0 is not one orch's exact restarts were "
                                                   "verified with (0.32.x): restarts load adapters only"), err
    # A verified version outside orch (no run directory) and any other program: untouched, silent.
    monkeypatch.delenv("ORCH_RUN_DIR")
    assert mlx_lm_resume.install("module", "mlx_lm", ["mlx_lm", "lora", "--resume"], version="0.32.2") is False
    monkeypatch.setenv("ORCH_RUN_DIR", str(tmp_path))
    assert mlx_lm_resume.install("script", "/x/train.py", ["/x/train.py", "--resume"], version="0.32.2") is False
    assert capsys.readouterr().err == ""


def test_orch_run_resume_needs_the_run_directory_to_continue(tmp_path):
    for extra, words in (([], "--resume: no --run-dir; give --run-dir DIR"),
                         (["--run-dir", str(tmp_path / "nope")], f"--resume: no run directory at {tmp_path / 'nope'}")):
        r = subprocess.run(orch_argv("run", "-n", "1", "--resume", *extra, "--", sys.executable, "-c", "pass"),
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------- over SSH (netns hosts, real sshd)

from tests.netns import make_cluster_fixture  # noqa: E402

c2m = make_cluster_fixture(2, scope="module", name="c2m")


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(900)
def test_over_ssh_the_state_comes_home_and_goes_back_bit_identically(c2m, fx, reference, tmp_path):
    """Rank 0's checkpoint comes home with collection, goes back to rank 0's host with the restart; the rank
    on the other host has none of its own and receives it from rank 0."""
    hosts = [{"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]} for h in c2m.hosts]
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    rd = tmp_path / "run"
    adapters = tmp_path / "adapters"  # written by rank 0 on its host (this filesystem, in the test)
    orch = _start(orch_argv("run", "--hostfile", str(hf), "--ssh-config", c2m.ssh_config_path, "--known-hosts",
                            str(c2m.known_hosts_path), "--python", sys.executable, "--run-dir", str(rd),
                            "--max-restarts", "1", "--restart-backoff", "0",
                            *[f"--env={k}={v}" for k, v in mlxlm_fixture.OFFLINE_ENV.items()],
                            "-m", "mlx_lm", "--", "lora", *_lora_args(fx, adapters)), tmp_path, tmp_path / "orch")
    try:
        ev = _wait_step(rd, KILL_AFTER, orch, timeout=400)
        rank1 = next(e["pid"] for e in ev if e["kind"] == "spawned" and e["rank"] == 1 and e["attempt"] == 0)
        os.kill(rank1, signal.SIGKILL)
        r = finish(orch, timeout=400)
    finally:
        kill_tree(orch.pid)
    err = (tmp_path / "orch.err").read_text()
    assert r.returncode == 0, err[-3000:]
    first, second = summary(rd)["attempts"]
    assert first["status"] == "failed" and second["status"] == "succeeded" and second["resumed"] is True
    saved = _saved_at(second["note"], rd)  # the collected copy, in the local run directory
    steps = [e["step"] for e in events(rd) if e["kind"] == "step" and e["attempt"] == 1]
    assert steps == list(range(saved + 1, ITERS + 1)), steps[:5]
    log0 = (rd / "logs" / "attempt-1" / "rank-0.log").read_text()
    said = next(line for line in log0.splitlines() if "mlx-lm resumes at iteration" in line)
    assert f"mlx-lm resumes at iteration {saved + 1} from " in said and str(rd) not in said, said  # its host's copy
    assert "rank 0 sent it to the 1 rank without a copy" in said, said  # rank 1's host had none
    assert _same(adapters, reference), "the restarted run's adapters differ from the uninterrupted run's"


def test_the_integration_imports_only_what_a_rank_may():
    """Rank-side code: ``orchestrator.protocol`` and ``orchestrator.runtime.*``, never a controller module."""
    import ast

    root = Path(__file__).resolve().parent.parent / "orchestrator" / "integrations"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            for name in names:
                if name.startswith("orchestrator."):
                    assert name.startswith(("orchestrator.protocol", "orchestrator.runtime",
                                            "orchestrator.integrations")), f"{path.name} imports {name}"
