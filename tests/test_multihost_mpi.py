"""A 3-host MPI run across network-namespace hosts: mpirun's own ssh, pointed at the test keys."""

from __future__ import annotations

import json
import sys

import pytest

from tests.netns import make_cluster_fixture  # noqa: F401
from tests.orch_helpers import RECIPES, events, run_orch, summary

pytestmark = [pytest.mark.netns, pytest.mark.slow]

cluster3 = make_cluster_fixture(3, scope="module", name="cluster3")


def test_three_host_mpi_allsum(cluster3, tmp_path):
    c = cluster3
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "mpi", "hosts": [
        {"ssh": h.name, "ips": [h.mgmt_ip], "python": sys.executable} for h in c.hosts]}))
    rd = tmp_path / "run"
    r = run_orch("run", str(RECIPES / "allsum_check.py"), "--hostfile", str(hf), "--ssh-config", str(c.ssh_config_path),
                 "--run-dir", str(rd), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in range(3):
        assert f"[{rank}] rank {rank}/3: all_sum = 6 (expected 6) OK" in r.stdout
    s = summary(rd)
    assert s["backend"] == "mpi" and s["status"] == "succeeded"
    cmd = (rd / "mpirun-command.txt").read_text()
    assert f"btl_tcp_if_include {c.mgmt_subnet}" in cmd or "btl_tcp_if_include 10.213." in cmd
    assert f"-F {c.ssh_config_path}" in cmd
    # each rank really ran on its own host (its own hostname in its own namespace)
    hosts = {e["rank"]: e["host"] for e in events(rd) if e["kind"] == "spawned"}
    assert hosts == {0: "host0", 1: "host1", 2: "host2"}
