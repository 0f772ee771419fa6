"""`orch run` over SSH on four network-namespace hosts with real sshd, no mocks.

One 4-host ring (tests/netns.py) is shared by the module. Every test runs the real `orch`
command, bounds its time, and checks afterwards that nothing of the run is left on any host
(only the sshd listeners may live in the namespaces).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.runtime import checkpoint as ckpt
from tests.netns import make_cluster_fixture
from tests.orch_helpers import RECIPES, SCRIPTS, events, finish, kill_tree, run_orch, start_orch, summary, wait_for_line

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(120)]

c4 = make_cluster_fixture(4, scope="module", name="c4")


@pytest.fixture(scope="module", autouse=True)
def _empty_remote_trash():
    """Runs retire their remote directories into runs/.trash-*; a later run deletes them. Leave none behind."""
    yield
    for d in REMOTE_RUNS.glob(".trash-*"):
        shutil.rmtree(d, ignore_errors=True)

REMOTE_RUNS = Path.home() / ".cache" / "mlx-orch" / "runs"  # the hosts share this filesystem


# ----------------------------------------------------------------------------- helpers


def write_hostfile(c, path: Path, per_host: dict | None = None) -> Path:
    """mlx.launch's format; each host lists both ring addresses with their /30 (the planner picks the left one)."""
    hosts = []
    for h in c.hosts:
        entry = {"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]}
        entry.update((per_host or {}).get(h.index, {}))
        hosts.append(entry)
    path.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    return path


def orch_run_args(c, tmp_path: Path, script: Path, run_dir: Path, *, known_hosts=None, hostfile=None,
                  extra=(), script_args=()) -> list[str]:
    return ["run", str(script), "--hostfile", str(hostfile or write_hostfile(c, tmp_path / "hosts.json")),
            "--ssh-config", c.ssh_config_path, "--known-hosts", str(known_hosts or c.known_hosts_path),
            "--python", sys.executable, "--run-dir", str(run_dir), *extra, "--", *script_args]


def run_processes(c) -> list[tuple[int, str]]:
    return c.running_processes()


def assert_hosts_clean(c, timeout: float = 6.0) -> float:
    """Wait (bounded) until nothing but sshd listens in the hosts; returns how long it took."""
    t0 = time.monotonic()
    while True:
        left = run_processes(c)
        if not left:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"still running on the hosts after {timeout}s: {left}")
        time.sleep(0.05)


def wait_for_event(run_dir: Path, kind: str, count: int = 1, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [e for e in events(run_dir) if e.get("kind") == kind]
        if len(hits) >= count:
            return hits
        time.sleep(0.01)
    raise AssertionError(f"{count} {kind!r} event(s) not seen in {timeout}s")


def remote_dirs_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "staging.json").read_text())["remote_dirs"]


def safetensors_payload_bytes(path: Path) -> int:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def set_link(c, i: int, iface: str, state: str) -> None:
    subprocess.run(["ip", "-n", c.namespaces[i], "link", "set", iface, state], check=True, timeout=10)


@pytest.fixture(autouse=True)
def _clean_between_tests(c4):
    yield
    for i in range(c4.n):  # a failed test must not leave a cable pulled for the next one
        for iface in ("ring_l", "ring_r", "mgmt0"):
            set_link(c4, i, iface, "up")
    for pid in c4.sshd_pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    try:
        assert_hosts_clean(c4, timeout=8)
    finally:
        for pid, _ in run_processes(c4):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- the tests


def test_four_host_ring_training_over_the_ring_links(c4, tmp_path):
    c = c4
    rd = tmp_path / "run"
    before = [c.iface_counters(i) for i in range(c.n)]
    steps = 20
    r = run_orch(*orch_run_args(c, tmp_path, RECIPES / "mlp_regression.py", rd,
                                script_args=["--steps", str(steps), "--checkpoint-every", "10", "--quiet-wait", "auto"]),
                 cwd=tmp_path, timeout=100)
    after = [c.iface_counters(i) for i in range(c.n)]
    assert r.returncode == 0, r.stderr[-3000:]

    s = summary(rd)
    assert s["status"] == "succeeded" and s["world_size"] == 4
    assert [x["host"] for x in s["ranks"]] == ["host0", "host1", "host2", "host3"]
    for rank in s["ranks"]:
        assert rank["exit_code"] == 0 and rank["steps"] == steps
        assert rank["memory"] and rank["memory"]["rss_peak_bytes"] > 0 and rank["memory"]["mlx_peak_bytes"] > 0
    for i in range(4):
        assert (rd / "logs" / f"rank-{i}.log").is_file()
    assert f"done at step {steps}" in (rd / "logs" / "rank-0.log").read_text()

    # The newest complete checkpoint came home (older ones stay behind), and it is loadable.
    cp = ckpt.latest_complete(rd / "checkpoints")
    assert cp is not None and cp.step == steps
    assert [p.name for p in ckpt.step_dirs(rd / "checkpoints")] == [f"step-{steps:08d}"]

    # Gradients went around the ring: every host sent at least (N-1)/N of them per step on its ring links.
    grad_bytes = safetensors_payload_bytes(cp.path / ckpt.MODEL_FILE)
    for i in range(c.n):
        sent = sum(after[i][ifc]["tx_bytes"] - before[i][ifc]["tx_bytes"] for ifc in ("ring_l", "ring_r"))
        got = sum(after[i][ifc]["rx_bytes"] - before[i][ifc]["rx_bytes"] for ifc in ("ring_l", "ring_r"))
        assert sent >= 0.75 * grad_bytes * steps and got >= 0.75 * grad_bytes * steps, (i, sent, got, grad_bytes)

    # --quiet-wait auto: each rank found itself alone on its host (told apart by ORCH_HOST, although the
    # namespaces share one hostname), so none of them waits on a loopback barrier.
    metric = {}
    for e in events(rd):
        if e.get("kind") == "metric":
            metric[e["rank"]] = e["values"]
    assert [metric[i]["quiet_wait_machine_ranks"] for i in range(4)] == [1, 1, 1, 1], metric
    assert not any("quiet_wait_ms_per_step" in m for m in metric.values())

    # Ranks addressed each other on the link to their left neighbour.
    plan = json.loads((rd / "plan.json").read_text())
    assert [r["listen"][0].split(":")[0] for r in plan["ranks"]] == [h.left_ip for h in c.hosts]

    # The run's remote directories are gone; nothing runs any more.
    assert not any(Path(d).exists() for d in remote_dirs_of(rd).values())
    assert_hosts_clean(c)


def test_unreachable_hosts_are_all_named_and_nothing_starts(c4, tmp_path):
    c = c4
    rd = tmp_path / f"unreachable-{os.getpid()}-{time.time_ns()}"
    hostfile = write_hostfile(c, tmp_path / "hosts.json", {1: {"port": 2}})  # nothing listens on port 2
    os.kill(c.hosts[2].sshd_pid, signal.SIGSTOP)  # host2 accepts TCP but never answers: a hung host
    try:
        t0 = time.monotonic()
        r = run_orch(*orch_run_args(c, tmp_path, RECIPES / "allsum_check.py", rd, hostfile=hostfile,
                                    extra=["--connect-timeout", "2"]), cwd=tmp_path, timeout=30)
        elapsed = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        lines = [l for l in r.stderr.splitlines() if l.startswith("orch: could not start the run")]
        assert len(lines) == 1, r.stderr
        assert "cannot reach 2 of 4 hosts" in lines[0]
        assert re.search(r"host1: connection refused at [\d.]+:2 ", lines[0]), lines[0]
        assert "host2: no answer within 2s" in lines[0]
        assert elapsed < 15
        s = summary(rd)
        assert s["status"] == "failed" and s["exit_code"] == 1 and all(x["pid"] is None for x in s["ranks"])
        assert not list(REMOTE_RUNS.glob(f"{rd.name}-*"))  # nothing was staged
        # Nothing of the run is left on the reachable hosts (sshd's session processes included).
        assert_hosts_clean(c)
    finally:
        os.kill(c.hosts[2].sshd_pid, signal.SIGCONT)


def test_ring_link_down_fails_naming_the_ranks_and_leaves_nothing(c4, tmp_path):
    """The cable between host1 and host2 is pulled while the ranks start: the ring cannot close."""
    c = c4
    rd = tmp_path / "run"
    p = start_orch(*orch_run_args(c, tmp_path, RECIPES / "mlp_regression.py", rd, extra=["--init-timeout", "4"],
                                  script_args=["--steps", "100000"]), cwd=tmp_path)
    try:
        wait_for_event(rd, "spawned", timeout=60)  # ranks are starting; none has reached MLX's init yet
        c.link_down(1)
        out, err = p.communicate(timeout=40)
    except BaseException:
        kill_tree(p.pid)
        p.communicate(timeout=10)
        raise
    finally:
        c.link_up(1)
    assert p.returncode != 0
    reason = summary(rd)["reason"]
    assert re.search(r"never became ready within --init-timeout 4s: .*\((host1|host2)", reason), reason
    assert "orch: run failed: " + reason in err
    assert_hosts_clean(c)


def test_controller_killed_with_sigkill_leaves_no_rank_behind(c4, tmp_path):
    c = c4
    rd = tmp_path / "run"
    p = start_orch(*orch_run_args(c, tmp_path, RECIPES / "mlp_regression.py", rd,
                                  script_args=["--steps", "100000", "--log-every", "5"]), cwd=tmp_path)
    try:
        wait_for_line(p, "step 5/", timeout=60)
        ranks = {e["from_rank"]: e["pid"] for e in wait_for_event(rd, "spawned", count=4)}
        assert all(any(pid == rp for pid, _ in run_processes(c)) for rp in ranks.values())
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        took = assert_hosts_clean(c, timeout=5)
    finally:
        kill_tree(p.pid)
        p.communicate(timeout=10)
    assert took < 5
    # What the dead controller left on the hosts' disk is the only trace (nobody could collect it).
    for d in remote_dirs_of(rd).values():
        shutil.rmtree(d, ignore_errors=True)


def test_ctrl_c_while_a_host_is_still_staging_runs_nothing_says_so_and_leaves_nothing(c4, tmp_path):
    """host1's python is slow to start (a wrapper that sleeps before it execs Python), so the launch is still
    staging when Ctrl-C comes; the other hosts' ranks may already be importing MLX. orch exits 130 with one
    line, writes the summary, retires every host's run directory, and no rank of it is left anywhere."""
    c = c4
    marker = tmp_path / "slow-python.pid"
    wrapper = tmp_path / "slow-python"
    wrapper.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {marker}\nwait $!\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    hostfile = write_hostfile(c, tmp_path / "hosts.json", {i: {"python": str(wrapper) if i == 1 else sys.executable}
                                                           for i in range(4)})
    rd = tmp_path / "run"
    before = {d.name for d in REMOTE_RUNS.iterdir()} if REMOTE_RUNS.exists() else set()
    p = start_orch("run", str(RECIPES / "allsum_check.py"), "--hostfile", str(hostfile), "--ssh-config",
                   c.ssh_config_path, "--known-hosts", c.known_hosts_path, "--run-dir", str(rd), cwd=tmp_path)
    sleeper = None
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text().strip()):
            assert p.poll() is None and time.monotonic() < deadline, "host1's staging never started"
            time.sleep(0.1)
        sleeper = int(marker.read_text())
        os.kill(p.pid, signal.SIGINT)
        r = finish(p, timeout=30)
    finally:
        kill_tree(p.pid)
        if sleeper is not None:  # ours (the wrapper's sleep): it outlives the closed session
            try:
                os.kill(sleeper, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert r.returncode == 130, r.stderr
    assert "interrupted while starting" in r.stderr and "Traceback" not in r.stderr, r.stderr
    s = summary(rd)
    assert s["status"] == "interrupted" and s["exit_code"] == 130
    assert not [e for e in events(rd) if e["kind"] in ("spawned", "init_start")]  # no rank ran anything
    assert_hosts_clean(c, timeout=10)
    left = {d.name for d in REMOTE_RUNS.iterdir()} - before
    assert not [d for d in left if not d.startswith(".trash")], left  # every site retired


def test_host_keys_are_verified_and_accept_new_records_them(c4, tmp_path):
    c = c4
    lines = Path(c.known_hosts_path).read_text().splitlines()
    key_of = {l.split()[0].split(",")[1]: " ".join(l.split()[1:3]) for l in lines}
    # host1 presents a key other than the one recorded for it.
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text("\n".join(l.replace(key_of["host1"], key_of["host0"]) if "host1" in l else l for l in lines) + "\n")
    for extra in ([], ["--ssh-accept-new"]):  # a changed key is refused even when new keys are accepted
        r = run_orch(*orch_run_args(c, tmp_path, RECIPES / "allsum_check.py", tmp_path / f"bad{len(extra)}",
                                    known_hosts=wrong, extra=extra), cwd=tmp_path, timeout=30)
        assert r.returncode == 1
        msg = next(l for l in r.stderr.splitlines() if l.startswith("orch: could not start the run"))
        assert "cannot reach 1 of 4 hosts: host1: host key CHANGED" in msg and "host0" not in msg
    # An empty known_hosts: refused without --ssh-accept-new, trusted and recorded with it.
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    r = run_orch(*orch_run_args(c, tmp_path, RECIPES / "allsum_check.py", tmp_path / "strict", known_hosts=empty),
                 cwd=tmp_path, timeout=30)
    assert r.returncode == 1 and "cannot reach 4 of 4 hosts: host0, host1, host2, host3: host key not verifiable" in r.stderr
    assert empty.read_text() == ""
    r = run_orch(*orch_run_args(c, tmp_path, RECIPES / "allsum_check.py", tmp_path / "tofu", known_hosts=empty,
                                extra=["--ssh-accept-new"]), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    recorded = empty.read_text().splitlines()
    assert len(recorded) == 4
    for h in c.hosts:
        assert any(l.split()[0] in (h.mgmt_ip, f"{h.name},{h.mgmt_ip}", f"{h.mgmt_ip},{h.name}")
                   and " ".join(l.split()[1:3]) == key_of[h.name] for l in recorded), (h.name, recorded)
    # And now the same file verifies strictly.
    r = run_orch(*orch_run_args(c, tmp_path, RECIPES / "allsum_check.py", tmp_path / "again", known_hosts=empty),
                 cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert empty.read_text().splitlines() == recorded


def test_second_run_of_the_same_code_uploads_nothing(c4, tmp_path):
    c = c4
    proj = tmp_path / "proj"
    proj.mkdir()
    # Content no earlier run has staged, so the first run must upload it.
    (proj / "allsum.py").write_text((RECIPES / "allsum_check.py").read_text() + f"\n# {tmp_path}\n")
    (proj / "data.txt").write_text(str(time.time()))
    stats = []
    for name in ("first", "second"):
        r = run_orch(*orch_run_args(c, tmp_path, proj / "allsum.py", tmp_path / name), cwd=tmp_path, timeout=60)
        assert r.returncode == 0, r.stderr
        stats.append(json.loads((tmp_path / name / "staging.json").read_text()))
    first, second = stats
    # The script and data.txt went up once (or once per host racing on the shared filesystem) ...
    assert 2 <= sum(h["uploaded"].get("code", 0) for h in first["hosts"].values()) <= 8
    # ... and not again. (The runtime is counted apart: it is only re-sent if orch itself changed in between.)
    for host in second["hosts"].values():
        assert host["placed"]["code"] == 2 and host["uploaded"].get("code", 0) == 0
    if all(h["runtime_reused"] for h in second["hosts"].values()):
        assert second["uploaded_files"] == 0 and second["uploaded_bytes"] == 0


def test_a_host_that_vanishes_mid_run_is_detected_within_seconds(c4, tmp_path):
    c = c4
    rd = tmp_path / "run"
    p = start_orch(*orch_run_args(c, tmp_path, RECIPES / "mlp_regression.py", rd,
                                  script_args=["--steps", "100000", "--log-every", "5", "--checkpoint-every", "5"]),
                   cwd=tmp_path)
    try:
        wait_for_line(p, "step 10/", timeout=60)
        set_link(c, 3, "mgmt0", "down")  # host3 drops off the management network (the ring stays up)
        t0 = time.monotonic()
        out, err = p.communicate(timeout=30)
        detected = time.monotonic() - t0
    except BaseException:
        kill_tree(p.pid)
        p.communicate(timeout=10)
        raise
    finally:
        set_link(c, 3, "mgmt0", "up")
    assert p.returncode == 255, err[-2000:]
    assert "rank 3 (host3) exited with code 255: lost the SSH connection to host3 (no answer to keepalives)" in err
    assert detected < 10
    s = summary(rd)
    assert s["failed_rank"] == 3 and s["ranks"][3]["exit_code"] == 255
    # A failed run still brings home the newest complete checkpoint (rank 0's host was reachable).
    cp = ckpt.latest_complete(rd / "checkpoints")
    assert cp is not None and cp.step >= 5
    # sshd on host3 gave up on us too (ClientAliveInterval), which stopped its rank through the guard.
    assert_hosts_clean(c, timeout=8)
    # host3's files could not be collected; the launcher said where they stay.
    kept = remote_dirs_of(rd)["host3"]
    assert f"its files stay in {kept}" in err
    shutil.rmtree(kept, ignore_errors=True)


def test_with_cwd_the_code_is_not_staged_but_the_runtime_is(c4, tmp_path):
    """mlx.launch's only mode: the script is already at the same path on every host (they share a filesystem here)."""
    c = c4
    rd = tmp_path / "run"
    r = run_orch(*orch_run_args(c, tmp_path, RECIPES / "allsum_check.py", rd, extra=["--cwd", str(RECIPES)]),
                 cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("OK") == 4
    for host in json.loads((rd / "staging.json").read_text())["hosts"].values():
        assert "code" not in host["placed"]


def test_ring_link_pulled_mid_training_is_a_hang_that_names_the_ranks(c4, tmp_path):
    """MLX's ring has no socket timeouts: a dead cable blocks every rank in all_sum. The watchdog ends it."""
    c = c4
    rd = tmp_path / "run"
    p = start_orch(*orch_run_args(c, tmp_path, RECIPES / "mlp_regression.py", rd, extra=["--hang-timeout", "3"],
                                  script_args=["--steps", "100000", "--log-every", "1000"]), cwd=tmp_path)
    try:
        wait_for_event(rd, "step", count=4 * 5, timeout=90)
        c.link_down(2)
        out, err = p.communicate(timeout=60)
    except BaseException:
        kill_tree(p.pid)
        p.communicate(timeout=10)
        raise
    finally:
        c.link_up(2)
    assert p.returncode == 1, err
    reason = summary(rd)["reason"]
    assert reason.startswith("hang: no rank made progress for 3s") and "last reported step" in reason, reason
    assert_hosts_clean(c)


def test_restart_over_ssh_resumes_from_the_checkpoint_brought_home(c4, tmp_path):
    c = c4
    rd = tmp_path / "run"
    marker = tmp_path / "crashed"  # the hosts share this filesystem
    r = run_orch(*orch_run_args(c, tmp_path, SCRIPTS / "crash_once.py", rd, extra=["--max-restarts", "1", "--restart-backoff", "0.1",
                                                                                      "--stage", str(RECIPES / "mlp_regression.py"),
                                                                                      "--env", "CRASH_AT=12", "--env", "CRASH_RANK=2",
                                                                                      "--env", f"CRASH_MARKER={marker}"],
                                script_args=["--steps", "20", "--checkpoint-every", "5", "--samples", "512", "--hidden", "16"]),
                 cwd=tmp_path, timeout=180)  # remote ranks get only what --env says, not this environment
    assert r.returncode == 0, r.stderr
    s = summary(rd)
    assert s["restarts"] == 1 and s["attempts"][0]["failed_rank"] == 2 and s["attempts"][1]["resumed"]
    first_steps = [e["step"] for e in events(rd)
                   if e["kind"] == "step" and e["attempt"] == 1 and e["rank"] == 0]
    assert first_steps[0] == 11 and first_steps[-1] == 20  # continued after the step-10 checkpoint
    assert json.loads((rd / "checkpoints" / "latest.json").read_text())["step"] == 20
    assert_hosts_clean(c)
