"""Real multi-process runs of `orch run` on this machine: results, failures, signals, hygiene."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess as _subprocess
import sys as _sys
import time

import pytest

from tests.orch_helpers import (RECIPES, SCRIPTS, alive, events, kill_tree, rank_pids, run_orch, start_orch, summary,
                                wait_for_line)

pytestmark = pytest.mark.slow


def test_three_rank_allsum_is_correct_and_recorded(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(RECIPES / "allsum_check.py"), "-n", "3", "--run-dir", str(rd), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for rank in range(3):
        assert re.search(rf"^\[{rank}\] rank {rank}/3: all_sum = 6 \(expected 6\) OK$", r.stdout, re.M), r.stdout
        log = (rd / "logs" / f"rank-{rank}.log").read_text()
        assert f"rank {rank}/3: all_sum = 6" in log and "\x1e" not in log
    s = summary(rd)
    assert s["status"] == "succeeded" and s["exit_code"] == 0 and s["failed_rank"] is None
    assert [x["rank"] for x in s["ranks"]] == [0, 1, 2]
    assert all(x["exit_code"] == 0 and x["signal"] is None and x["pid"] for x in s["ranks"])
    assert s["duration_s"] > 0
    kinds = [e["kind"] for e in events(rd)]
    assert kinds.count("ready") == 3 and kinds.count("spawned") == 3
    assert not alive(rank_pids(rd), timeout=2)


def test_failing_rank_stops_everyone_with_its_exit_code(tmp_path):
    rd = tmp_path / "run"
    t0 = time.monotonic()
    r = run_orch("run", str(SCRIPTS / "fail_one.py"), "-n", "3", "--run-dir", str(rd), cwd=tmp_path,
                 env={"FAIL_RANK": "1", "FAIL_CODE": "3", "FAIL_AFTER": "0.5", "SPAWN_CHILD": "1"})
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, r.stderr
    assert elapsed < 15
    assert "rank 1 (localhost) exited with code 3" in r.stderr
    assert "failing on purpose" in r.stderr.split("last lines of rank 1")[1]
    s = summary(rd)
    assert s["status"] == "failed" and s["failed_rank"] == 1 and s["exit_code"] == 3
    children = [int(m) for m in re.findall(r"child (\d+)", r.stdout)]
    assert len(children) == 3
    assert not alive(rank_pids(rd) + children, timeout=3), "a rank or its child outlived the run"


def test_rank_killed_by_signal_maps_to_128_plus_signal(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(SCRIPTS / "fail_one.py"), "-n", "2", "--run-dir", str(rd), cwd=tmp_path,
                 env={"FAIL_RANK": "0", "FAIL_SIGNAL": str(int(signal.SIGKILL)), "FAIL_AFTER": "0.2"})
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    s = summary(rd)
    assert s["ranks"][0]["signal"] == signal.SIGKILL and s["failed_rank"] == 0
    assert "killed by SIGKILL" in r.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_orch_stops_every_rank(tmp_path, sig, code):
    rd = tmp_path / "run"
    p = start_orch("run", str(SCRIPTS / "sleeper.py"), "-n", "3", "--run-dir", str(rd), "--", "120", cwd=tmp_path)
    try:
        lines = wait_for_line(p, "sleeping", count=3, timeout=60)
        pids = [int(m) for m in re.findall(r"pid (\d+) sleeping", "".join(lines))]
        p.send_signal(sig)
        p.communicate(timeout=15)
        assert p.returncode == code
        assert summary(rd)["status"] == "interrupted"
        assert not alive(pids, timeout=3), "a rank outlived the controller"
    finally:
        kill_tree(p.pid)


STUBBORN = """
import os, signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, lambda *_: print(f"pid {os.getpid()} ignores SIGTERM", flush=True))
print(f"pid {os.getpid()} sleeping", flush=True)
while True:
    time.sleep(1)
"""


def test_a_second_sigint_kills_every_rank_without_waiting_out_the_grace(tmp_path):
    """Ranks that ignore SIGTERM under --grace 600: the second Ctrl-C ends them at once (else 600 s)."""
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    rd = tmp_path / "run"
    p = start_orch("run", str(script), "-n", "2", "--grace", "600", "--run-dir", str(rd), cwd=tmp_path)
    try:
        pids = [int(m) for m in re.findall(r"pid (\d+) sleeping", "".join(wait_for_line(p, "sleeping", count=2)))]
        p.send_signal(signal.SIGINT)
        wait_for_line(p, "ignores SIGTERM", count=2)  # both are in their grace now
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert "stopping all ranks (again to kill them now)" in err and "SIGINT again; killing every rank now" in err
        s = summary(rd)
        assert s["status"] == "interrupted" and all(r["signal"] == signal.SIGKILL for r in s["ranks"]), s["ranks"]
        assert not alive(pids, timeout=5)
    finally:
        kill_tree(p.pid)


def test_controller_sigkill_leaves_no_rank(tmp_path):
    rd = tmp_path / "run"
    p = start_orch("run", str(SCRIPTS / "sleeper.py"), "-n", "2", "--run-dir", str(rd), "--", "120", cwd=tmp_path)
    try:
        lines = wait_for_line(p, "sleeping", count=2, timeout=60)
        pids = [int(m) for m in re.findall(r"pid (\d+) sleeping", "".join(lines))]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        assert not alive(pids, timeout=5), "ranks survived a SIGKILLed controller"
    finally:
        kill_tree(p.pid)


def test_single_rank_works(tmp_path):
    r = run_orch("run", str(RECIPES / "allsum_check.py"), "-n", "1", "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[0] rank 0/1: all_sum = 1 (expected 1) OK" in r.stdout


def test_script_that_never_inits_and_exits_zero_is_fine(tmp_path):
    r = run_orch("run", str(SCRIPTS / "no_init.py"), "-n", "2", "--run-dir", str(tmp_path / "r"),
                 "--init-timeout", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[0] no init here, rank 0" in r.stdout and "[1] no init here, rank 1" in r.stdout


def test_init_timeout_names_the_rank_that_never_joined(tmp_path):
    rd = tmp_path / "run"
    t0 = time.monotonic()
    r = run_orch("run", str(SCRIPTS / "partial_init.py"), "-n", "3", "--run-dir", str(rd),
                 "--init-timeout", "3", cwd=tmp_path, env={"LATE_RANK": "2"})
    assert time.monotonic() - t0 < 20
    assert r.returncode == 1, r.stderr
    assert re.search(r"never became ready within --init-timeout 3s: .*2 \(localhost, never called init\)", r.stderr), r.stderr
    assert not alive(rank_pids(rd), timeout=3)


def test_env_cwd_args_and_hostfile_envs_reach_ranks(tmp_path):
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"envs": ["FROM_HOSTFILE=hf"], "hosts": [
        {"ssh": "localhost", "ips": ["127.0.0.1"], "slots": 2, "env": {"FROM_HOST": "h"}}]}))
    work = tmp_path / "work"
    work.mkdir()
    r = run_orch("run", str(SCRIPTS / "env_report.py"), "--hostfile", str(hf), "--env", "FROM_CLI=c d",
                 "--cwd", str(work), "--run-dir", str(tmp_path / "r"), "--", "--lr", "3e-4", "x y", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reports = {int(m.group(1)): json.loads(m.group(2)) for m in re.finditer(r"^\[(\d)\] REPORT (.*)$", r.stdout, re.M)}
    assert set(reports) == {0, 1}
    for rank, rep in reports.items():
        assert rep["argv"] == ["--lr", "3e-4", "x y"]
        assert rep["cwd"] == str(work)
        assert rep["env"]["MLX_RANK"] == str(rank)
        assert rep["env"]["FROM_CLI"] == "c d" and rep["env"]["FROM_HOSTFILE"] == "hf" and rep["env"]["FROM_HOST"] == "h"
        assert rep["env"]["ORCH_HOST"] == "localhost"  # the hostfile's name: which ranks share a machine
        assert json.loads(open(rep["env"]["MLX_HOSTFILE"]).read())[rank][0].startswith("127.0.0.1:")


def test_default_run_dir_is_under_runs(tmp_path):
    r = run_orch("run", str(SCRIPTS / "no_init.py"), "-n", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    dirs = list((tmp_path / "runs").iterdir())
    assert len(dirs) == 1 and dirs[0].name.endswith("-no_init")
    assert summary(dirs[0])["status"] == "succeeded"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs and Linux")
def test_bind_gives_each_rank_its_own_cpus(tmp_path):
    rd = tmp_path / "run"
    r = run_orch("run", str(SCRIPTS / "affinity_report.py"), "-n", "2", "--bind", "--run-dir", str(rd), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sets = [set(json.loads(re.search(r"CPUS (\[.*\])", (rd / "logs" / f"rank-{i}.log").read_text()).group(1))) for i in range(2)]
    assert sets[0] and sets[1] and not sets[0] & sets[1]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_forms_without_mlx_connect_retries(tmp_path, n):
    """The gate + hold sequencing means no rank ever connects before its peer listens.

    MLX_RING_VERBOSE makes MLX print "Attempt k waiting ..." for every retry, so a
    retry-free start is visible in the logs (no timing involved).
    """
    for i in range(4):
        rd = tmp_path / f"run{i}"
        r = run_orch("run", str(RECIPES / "allsum_check.py"), "-n", str(n), "--run-dir", str(rd),
                     "--env", "MLX_RING_VERBOSE=1", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        logs = "".join((rd / "logs" / f"rank-{k}.log").read_text() for k in range(n))
        assert "Attempt" not in logs, f"run {i}: a rank had to retry its connect:\n{logs}"
        kinds = [(e["kind"], e["rank"]) for e in events(rd)]
        assert ("listening", 0) in kinds and ("listening", n - 1) in kinds


def test_json_flag_prints_only_the_summary_on_stdout(tmp_path):
    r = run_orch("run", str(RECIPES / "allsum_check.py"), "-n", "2", "--json", "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["status"] == "succeeded" and [x["rank"] for x in data["ranks"]] == [0, 1]
    assert "[0] rank 0/2" in r.stderr  # rank output moved to stderr


def test_prestarted_ranks_get_env_cwd_and_args(tmp_path):
    """`-n N` ranks start before the plan exists (launch/prespawn.py); what they see must not differ."""
    work = tmp_path / "work"
    work.mkdir()
    r = run_orch("run", str(SCRIPTS / "env_report.py"), "-n", "2", "--env", "FROM_CLI=x y", "--cwd", str(work),
                 "--run-dir", str(tmp_path / "r"), "--", "--lr", "1e-3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    reports = {int(m.group(1)): json.loads(m.group(2)) for m in re.finditer(r"^\[(\d)\] REPORT (.*)$", r.stdout, re.M)}
    assert set(reports) == {0, 1}
    for rank, rep in reports.items():
        assert rep["argv"] == ["--lr", "1e-3"] and rep["cwd"] == str(work)
        assert rep["env"]["MLX_RANK"] == str(rank) and rep["env"]["FROM_CLI"] == "x y"


def test_a_whole_run_without_pidfd_open_prestarts_and_supervises(tmp_path):
    """The macOS branch, forced here: no os.pidfd_open, so each pre-started guard is waited on by a
    thread in waitpid. The ranks still start before the plan, and every exit is seen."""
    rd = tmp_path / "r"
    code = "\n".join([
        "import os, sys",
        "del os.pidfd_open",
        "from orchestrator.launch import local",
        "prepare = local.LocalLauncher.prepare",
        "async def counting(self, specs):",
        "    await prepare(self, specs)",
        "    sys.stderr.write(f'configured {sorted(self._configured)}\\n')",
        "local.LocalLauncher.prepare = counting",
        "from orchestrator.cli import entry",
        "entry()"])
    r = _subprocess.run([_sys.executable, "-c", code, "run", str(RECIPES / "allsum_check.py"), "-n", "3",
                         "--run-dir", str(rd)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "configured [0, 1, 2]" in r.stderr  # every rank was pre-started and configured before supervision
    assert r.stdout.count(" OK") == 3
    s = summary(rd)
    assert s["status"] == "succeeded" and [x["exit_code"] for x in s["ranks"]] == [0, 0, 0]


def test_prestarted_ranks_are_stopped_when_the_run_never_starts(tmp_path):
    import psutil

    t0 = time.time() - 1
    r = run_orch("run", str(tmp_path / "missing.py"), "-n", "3", cwd=tmp_path)
    assert r.returncode == 2 and "no such script" in r.stderr

    def deferred():
        out = []
        for p in psutil.process_iter(["cmdline", "create_time", "status"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["create_time"] >= t0 and p.info["status"] != psutil.STATUS_ZOMBIE and (
                    "--deferred" in cmd or cmd.endswith("orchestrator.runtime.bootstrap")):
                out.append(p.pid)
        return out

    deadline = time.monotonic() + 10
    while deferred() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not deferred(), "pre-started ranks outlived a run that never started"


@pytest.mark.parametrize("program", ["no-such-program-orch", "./missing.sh"])
def test_a_command_that_is_not_there_is_refused_before_anything_starts(tmp_path, program):
    r = run_orch("run", "-n", "2", "--run-dir", str(tmp_path / "run"), "--", program, "--flag", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"orch: error: -- {program}: no such program here (not on PATH, not a file); "
                                "check the name, or give its path")
    assert not (tmp_path / "run").exists()


def test_the_rank_with_the_real_error_is_named_not_the_one_that_stopped_with_it(tmp_path):
    """rank 0 cannot --resume; rank 1 stops with it ("other rank(s) failed"): rank 0 is the cause, whoever exits first."""
    rd = tmp_path / "run"
    r = run_orch("run", str(RECIPES / "mlp_regression.py"), "-n", "2", "--run-dir", str(rd), "--",
                 "--resume", str(tmp_path / "nonexistent"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr  # bad input: one line and exit 2, on every rank, no traceback
    s = summary(rd)
    assert s["failed_rank"] == 0, s["reason"]
    assert "no such file or directory" in r.stderr.split("last lines of rank 0")[1]
    assert "Traceback" not in r.stderr and "Traceback" not in (rd / "logs" / "rank-0.log").read_text()
    assert not alive(rank_pids(rd), timeout=3)


# ---- the launcher's own parts, in-process (real guards, real ranks) ----------

import asyncio as _asyncio

from orchestrator import protocol as _protocol
from orchestrator.launch import local as _local
from orchestrator.launch import prespawn as _prespawn
from orchestrator.launch.base import RankSpec as _RankSpec


def _spec(tmp_path, python=None):
    return _RankSpec(rank=0, host="localhost", script=str(SCRIPTS / "no_init.py"), python=python, env={
        "MLX_RANK": "0", "ORCH_EVENTS": "1", "PYTHONUNBUFFERED": "1", "ORCH_RUN_DIR": str(tmp_path)})


async def _events_until_exit(handle) -> tuple[list[dict], object]:
    events = []
    while True:
        line = await _asyncio.wait_for(handle.stdout.readline(), 60)
        if not line:
            break
        _, payload = _protocol.split_line(line.decode())
        if payload is not None:
            events.append(payload)
    return events, await _asyncio.wait_for(handle.wait(), 60)


@pytest.mark.parametrize("how", ["prestarted", "prestarted-no-pidfd", "started", "prespawn-off"])
def test_the_guard_gets_a_fresh_token_and_signs_its_events_with_it(tmp_path, how, monkeypatch):
    """Every local path: a pre-started --deferred guard (token in its configuration line) waited on
    through a pidfd (Linux) or, where there is no pidfd_open (macOS), by a thread in waitpid; a guard
    started now (token as its first stdin line); and ORCH_PRESPAWN=0, where nothing is pre-started."""
    if how == "prestarted-no-pidfd":
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    if how == "prespawn-off":
        monkeypatch.setenv("ORCH_PRESPAWN", "0")

    async def go():
        if how == "prespawn-off":
            _prespawn.discard()
            _prespawn.start(1)
            assert _prespawn.take() is None  # nothing pre-started
            handle = await _local.LocalLauncher().start(_spec(tmp_path))
            assert isinstance(handle, _local.LocalRank)
        elif how.startswith("prestarted"):
            _prespawn.discard()  # only this test's guard in the pool
            _prespawn.start(1)
            launcher = _local.LocalLauncher()
            await launcher.prepare([_spec(tmp_path)])  # the configuration goes out here, before start
            assert _prespawn.take() is None  # the pre-started guard was taken
            handle = await launcher.start(_spec(tmp_path))
            assert isinstance(handle, _local.PrestartedRank)
            assert hasattr(handle, "_pidfd") == (how == "prestarted")
        else:
            handle = await _local.LocalLauncher().start(_spec(tmp_path, python=_sys.executable))
            assert isinstance(handle, _local.LocalRank)
        try:
            return handle, *(await _events_until_exit(handle))
        finally:
            handle.kill()

    handle, events, status = _asyncio.run(go())
    assert status.ok
    assert handle.token and len(handle.token) == 32
    guard_events = [e for e in events if e["kind"] in _protocol.GUARD_KINDS]
    assert {e["kind"] for e in guard_events} >= {"spawned", "exited"}
    assert all(e.get(_protocol.TOKEN_FIELD) == handle.token for e in guard_events)


def test_a_configured_guard_never_adopted_stops_its_rank_on_aclose(tmp_path):
    """``prepare`` hands a pre-started guard its configuration, so its program runs before the
    supervisor exists; if the attempt ends before ``start`` (an error, Ctrl-C), ``aclose`` must still
    end that guard and its rank."""
    import psutil

    spec = _spec(tmp_path)
    spec.script = str(SCRIPTS / "sleeper.py")
    spec.script_args = ["120"]

    async def go():
        _prespawn.discard()  # only this test's guard in the pool
        _prespawn.start(1)
        proc = _prespawn._pool[0]
        launcher = _local.LocalLauncher()
        await launcher.prepare([spec])
        rank_pid = None
        while rank_pid is None:  # the guard's spawned event: the program is running, unsupervised
            line = await _asyncio.wait_for(_asyncio.to_thread(proc.stdout.readline), 60)
            assert line, "the guard ended before spawning its rank"
            _, payload = _protocol.split_line(line.decode())
            if payload and payload["kind"] == "spawned":
                rank_pid = payload["pid"]
        await _asyncio.wait_for(launcher.aclose(), 60)
        return proc, rank_pid

    proc, rank_pid = _asyncio.run(go())
    assert proc.returncode is not None
    try:
        rank = psutil.Process(rank_pid)
        rank.wait(timeout=30)  # the guard stops it on EOF (SIGTERM); bounded
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(rank_pid) or psutil.Process(rank_pid).status() == psutil.STATUS_ZOMBIE


def test_last_resort_kill_reaches_only_the_guards_own_groups(tmp_path):
    """kill() SIGKILLs the guard's group and the rank's group only while it is the guard's rank:
    a pid the handle was told that is not (1, a stranger's) is never signalled."""
    stranger = _subprocess.Popen([_sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    ranks: list[int] = []

    async def one(told):
        spec = _spec(tmp_path, python=_sys.executable)
        spec.script = str(SCRIPTS / "sleeper.py")
        spec.env["ORCH_GRACE_S"] = "60"
        handle = await _local.LocalLauncher().start(spec)
        while True:  # the guard's spawned event
            _, payload = _protocol.split_line((await _asyncio.wait_for(handle.stdout.readline(), 60)).decode())
            if payload and payload["kind"] == "spawned":
                ranks.append(payload["pid"])
                break
        assert _local.guards_group(ranks[-1], handle.proc.pid)
        assert not _local.guards_group(stranger.pid, handle.proc.pid) and not _local.guards_group(1, handle.proc.pid)
        handle.rank_pid = told if told is not None else ranks[-1]
        handle.kill()
        return await _asyncio.wait_for(handle.wait(), 30)

    try:
        for told in (1, stranger.pid, None):
            status = _asyncio.run(one(told))
            assert status.signal == signal.SIGKILL  # the guard's own group, always
            assert stranger.poll() is None
        assert not alive(ranks[-1:], timeout=5), "the guard's rank survived the last-resort kill"
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)  # ranks orphaned by the refused kills: ours, by pid
            except ProcessLookupError:
                pass
        stranger.kill()
        stranger.wait()


NAN_LOSS = """
from orchestrator.runtime import report
for i in range(1, 6):
    report.step(i, loss=1.0 / i if i < 3 else float("nan"))
"""


def _strict_json(text: str):
    """JSON as JavaScript's JSON.parse reads it: a bare NaN/Infinity is an error."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_a_nan_loss_is_pointed_out_and_every_file_stays_strict_json(tmp_path):
    (tmp_path / "nan.py").write_text(NAN_LOSS)
    rd = tmp_path / "run"
    r = run_orch("run", "-n", "2", "--json", "--run-dir", str(rd), "nan.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "orch: rank 0 reported loss nan at step 3: training diverged" in r.stderr or \
        "orch: rank 1 reported loss nan at step 3: training diverged" in r.stderr, r.stderr
    s = _strict_json((rd / "summary.json").read_text())
    assert [x["nonfinite_loss_step"] for x in s["ranks"]] == [3, 3] and [x["last_loss"] for x in s["ranks"]] == [None, None]
    assert s["warnings"] == ["the loss of rank 0 was NaN or infinite from step 3 on: the run diverged "
                             "(and that of 1 more rank)"]
    steps = [e for e in map(_strict_json, (rd / "events.jsonl").read_text().splitlines()) if e["kind"] == "step"]
    assert sorted(e["loss"] for e in steps if e["step"] < 3) == [0.5, 0.5, 1.0, 1.0]
    assert all(e["loss"] is None for e in steps if e["step"] >= 3) and len(steps) == 10
    assert _strict_json(r.stdout)["diverged_at_step"] == 3  # --json: the final summary, strict too
    report = run_orch("report", str(rd), cwd=tmp_path)
    assert re.search(r"final loss \(mean\): NaN/inf \(step 3\)", report.stdout), report.stdout
