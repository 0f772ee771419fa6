"""MLX_IBV_DEVICES reaches remote ranks: the file is staged into each host's run directory and the
variable names that copy, not the controller's local path.

The hosts are network namespaces with real sshd (tests/netns.py). They share this machine's
filesystem, so a rank handed the controller's own path would read the right matrix by accident:
the test therefore checks *where* the file is (the host's remote run root from staging.json) as
well as what it holds (the hostfile's rdma matrix, parsed as JACCL parses it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from orchestrator.launch.base import RankSpec
from orchestrator.launch.ssh_commands import remote_env, staged_files
from tests.netns import make_cluster_fixture
from tests.orch_helpers import SCRIPTS, events, run_orch

CONTRACT = SCRIPTS / "jaccl_contract.py"
REMOTE_RUNS = Path.home() / ".cache" / "mlx-orch" / "runs"  # the hosts share this filesystem


# ----------------------------------------------------------------------------- unit: the rewrite


def test_remote_env_points_file_variables_at_the_staged_copy():
    spec = RankSpec(rank=1, host="mac1", script="s.py", env={
        "MLX_IBV_DEVICES": "/local/run/mlx-ibv-devices.json", "MLX_HOSTFILE": "/local/run/mlx-hostfile.json",
        "MLX_JACCL_COORDINATOR": "10.0.0.1:5000"}, mlx_hostfile_json="[]")
    assert staged_files(spec) == {"MLX_IBV_DEVICES": "/local/run/mlx-ibv-devices.json"}  # MLX_HOSTFILE travels inline
    env = remote_env(spec, run_dir="/r/x-h1/run", pythonpath="/rt", files_dir="/r/x-h1")
    assert env["MLX_IBV_DEVICES"] == "/r/x-h1/mlx-ibv-devices.json"
    assert "MLX_HOSTFILE" not in env and env["ORCH_MLX_HOSTFILE_JSON"] == "[]"
    assert env["MLX_JACCL_COORDINATOR"] == "10.0.0.1:5000"  # an address, not a file: unchanged
    assert staged_files(RankSpec(rank=0, host="h", script="s.py", env={"A": "1"})) == {}


def test_the_bootstrap_writes_the_ring_hostfile_into_the_remote_run_root_not_tmp(tmp_path):
    """MLX_HOSTFILE travels inline (ORCH_MLX_HOSTFILE_JSON); the bootstrap writes it beside the other staged files."""
    import subprocess

    root = tmp_path / "runs" / "x-h1"
    (root / "run").mkdir(parents=True)
    script = tmp_path / "show.py"
    script.write_text("import os; print(os.environ['MLX_HOSTFILE']); print(open(os.environ['MLX_HOSTFILE']).read())\n")
    content = json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5001"]])
    for run_dir, where in ((root / "run", str(root)), (tmp_path / "gone" / "run", None)):
        env = {**os.environ, "ORCH_MLX_HOSTFILE_JSON": content, "ORCH_RUN_DIR": str(run_dir),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        env.pop("ORCH_EVENTS", None)
        r = subprocess.run([sys.executable, "-m", "orchestrator.runtime.bootstrap", str(script)], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        path, text = r.stdout.split("\n", 1)
        assert text.strip() == content
        if where is None:  # no run root there: the system's temporary directory, as before
            import tempfile

            assert os.path.dirname(path) == tempfile.gettempdir()
            os.unlink(path)
        else:
            assert os.path.dirname(path) == where


# ----------------------------------------------------------------------------- netns hosts


c3 = make_cluster_fixture(3, scope="module", name="c3")


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "c3" not in request.fixturenames:
        return
    c = request.getfixturevalue("c3")
    deadline = time.monotonic() + 8
    while c.running_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = c.running_processes()
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for d in REMOTE_RUNS.glob(".trash-*"):
        shutil.rmtree(d, ignore_errors=True)
    assert not left, f"still running on the hosts: {left}"


def matrix(n: int) -> list[list]:
    """mlx.distributed_config's shape: host i reaches host j over a distinct device."""
    return [[None if i == j else f"rdma_en{2 + (i + j) % 4}" for j in range(n)] for i in range(n)]


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["jaccl", "jaccl-ring"])
def test_remote_ranks_read_the_hostfiles_rdma_matrix_from_their_own_run_dir(c3, tmp_path, backend):
    c = c3
    rdma = matrix(c.n)
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": backend, "hosts": [
        {"ssh": h.name, "ips": [h.mgmt_ip], "rdma": rdma[h.index]} for h in c.hosts]}))
    rd = tmp_path / "run"
    r = run_orch("run", str(CONTRACT), "--hostfile", str(hf), "--ssh-config", c.ssh_config_path,
                 "--known-hosts", c.known_hosts_path, "--python", sys.executable, "--run-dir", str(rd),
                 cwd=tmp_path, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]

    seen = {}
    for i in range(c.n):
        lines = [l for l in (rd / "logs" / f"rank-{i}.log").read_text().splitlines() if l.startswith("JACCL ")]
        assert len(lines) == 1, (i, lines)
        seen[i] = json.loads(lines[0][len("JACCL "):])
    remote = json.loads((rd / "staging.json").read_text())["remote_dirs"]
    plan = json.loads((rd / "plan.json").read_text())
    for i, got in seen.items():
        host = c.hosts[i]
        assert got["rank"] == i and got["host"] == host.name
        assert got["matrix"] == rdma  # what JACCL reads: the hostfile's matrix, all N rows
        # The host's own staged copy, not the controller's file (which this shared filesystem could also reach).
        assert got["path"] == f"{remote[host.name]}/mlx-ibv-devices.json", got["path"]
        assert not got["realpath"].startswith(os.path.realpath(rd))
        assert got["coordinator"] == plan["coordinator"] and plan["coordinator"].startswith(f"{c.hosts[0].mgmt_ip}:")
        assert got["ring"] == ("1" if backend == "jaccl-ring" else None)
    assert json.loads((rd / "mlx-ibv-devices.json").read_text()) == rdma  # the controller's copy (mlx.launch's)
    # Inputs are not collected back as if the ranks had written them; the remote run roots are retired.
    assert not list((rd / "hosts").rglob("mlx-ibv-devices.json")) if (rd / "hosts").exists() else True
    assert not any(Path(d).exists() for d in remote.values())


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fallback_over_ssh_continues_on_the_ring_links_from_the_checkpoint(c3, tmp_path):
    """The JACCL attempt's remote stand-ins replay the recorded init failure (exo#1390); the ring attempt
    resumes on the same hosts over their ring links from the checkpoint an earlier run left."""
    from tests.test_jaccl_fallback import RTR_0, RTR_1, SMALL, STANDIN

    c = c3
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "jaccl", "hosts": [
        {"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"], "rdma": matrix(c.n)[h.index]} for h in c.hosts]}))
    rd = tmp_path / "run"
    common = ["--hostfile", str(hf), "--ssh-config", c.ssh_config_path, "--known-hosts", c.known_hosts_path,
              "--python", sys.executable, "--run-dir", str(rd), "--stage", str(STANDIN.parents[2] / "recipes" / "mlp_regression.py")]
    r = run_orch("run", str(STANDIN), *common, "--backend", "ring", "--", *SMALL, "--steps", "10", "--checkpoint-every", "5",
                 cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    # Remote ranks get only what --env says (the recordings are on the filesystem the hosts share).
    env = ["--env", "JACCL_STANDIN=init_fail", "--env", f"JACCL_STDERR_0={RTR_0}", "--env", f"JACCL_STDERR_1={RTR_1}",
           "--env", f"JACCL_STDERR_2={RTR_1}"]
    r = run_orch("run", str(STANDIN), *common, *env, "--max-restarts", "1", "--restart-backoff", "0.1",
                 "--fallback-backend", "ring", "--", *SMALL, "--steps", "20", "--checkpoint-every", "5",
                 cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((rd / "summary.json").read_text())
    assert [a["backend"] for a in s["attempts"]] == ["jaccl", "ring"]
    assert s["attempts"][0]["diagnosis_cause"] == "jaccl_queue_pair" and s["attempts"][1]["resumed"]
    assert "from the latest checkpoint" in s["attempts"][0]["note"]
    steps = sorted(e["step"] for e in events(rd)
                   if e["kind"] == "step" and e.get("attempt") == 1 and e["rank"] == 0)
    assert steps[0] == 11 and steps[-1] == 20
    plan = json.loads((rd / "plan.json").read_text())
    assert [p["listen"][0].split(":")[0] for p in plan["ranks"]] == [h.left_ip for h in c.hosts]  # the ring links
