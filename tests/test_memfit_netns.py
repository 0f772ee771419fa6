"""Mixed memory over SSH: a network-namespace host with less memory than the job wants.

Two namespace hosts with their own sshd; host1's sshd (and so everything it
starts: the guard and the rank) is moved into a memory cgroup (v1
``memory.limit_in_bytes``) whose limit is the host's "RAM", and the hostfile
says so with ``memory_gb``. Inside ``ip netns exec`` ``/sys`` is remounted
without the cgroup tree, so the rank cannot read its limit itself: the
hostfile's ``memory_gb`` is how the plan learns it, as on a Mac.

* Unplanned (``--no-memory-check``): host1's rank is killed by the OOM killer.
* ``--fit-memory``: host1's rank splits its batch, host0's does not, and the
  run ends with the parameters of the same run on unconstrained hosts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.netns import netns_cluster  # noqa: F401 (fixture)
from tests.orch_helpers import RECIPES, events, run_orch, summary
from tests.runtime_helpers import latest_checkpoint, load_arrays, max_abs_diff

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(600)]  # two bounded runs of up to 240 s each under load

MLP = RECIPES / "mlp_regression.py"
MEMCG_ROOT = Path("/sys/fs/cgroup/memory")
ARGS = ["--hidden", "1024", "--samples", "16384", "--batch-size", "4096", "--optimizer", "sgd", "--lr", "1e-2",
        "--stats-every", "1", "--steps", "4"]
MiB = 2**20


def _hostfile(c, path: Path, memory_gb=None) -> Path:
    hosts = []
    for h in c.hosts:
        entry = {"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"], "python": sys.executable}
        if memory_gb is not None and h.index == 1:
            entry["memory_gb"] = memory_gb
        hosts.append(entry)
    path.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    return path


def _orch(c, tmp_path: Path, name: str, hostfile: Path, extra: list[str]):
    run_dir = tmp_path / name
    r = run_orch("run", str(MLP), "--hostfile", str(hostfile), "--ssh-config", c.ssh_config_path,
                 "--known-hosts", c.known_hosts_path, "--run-dir", str(run_dir), "--", *ARGS, *extra,
                 cwd=tmp_path, timeout=240)
    return r, run_dir


def _memory_cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise AssertionError(f"pid {pid} has no memory cgroup")


def test_a_host_with_little_memory_is_oom_killed_unplanned_and_fits_when_planned(netns_cluster, tmp_path):  # noqa: F811
    if not (MEMCG_ROOT / "memory.limit_in_bytes").exists():
        pytest.skip("needs the cgroup v1 memory controller (as root)")
    c = netns_cluster(2)
    # Unconstrained: where the run must end, and each rank's plan (the numbers to size host1's "RAM" from).
    r, free_dir = _orch(c, tmp_path, "free", _hostfile(c, tmp_path / "hosts-free.json"), [])
    assert r.returncode == 0, r.stderr[-3000:]
    (e,) = [x for x in events(free_dir) if x.get("kind") == "memory_plan" and x.get("rank") == 1]
    activations = e["per_sample_bytes"] * e["batch"]
    fixed = e["planned_peak_bytes"] - activations
    rank_budget = int(fixed + 0.45 * activations)  # what host1 can give the rank: under half of its batch
    overhead = 60 * MiB  # sshd's session, the guard, the staged files' page cache
    limit = rank_budget + overhead
    memory_gb = rank_budget / 2**30  # what the hostfile tells host1's rank (the plan keeps 10 % of it spare)

    cg = MEMCG_ROOT / f"orch-test-netns-{os.getpid()}-{time.monotonic_ns()}"
    sshd = c.hosts[1].sshd_pid
    home = _memory_cgroup_of(sshd)
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        (cg / "cgroup.procs").write_text(str(sshd))  # everything host1's sshd starts from now on is under it
        hosts = _hostfile(c, tmp_path / "hosts-small.json", memory_gb=round(memory_gb, 4))

        r, unplanned = _orch(c, tmp_path, "unplanned", hosts, ["--no-memory-check"])
        s = summary(unplanned)
        assert r.returncode != 0 and s["failed_rank"] == 1, r.stderr[-3000:]
        assert s["ranks"][1]["signal"] == 9, s["ranks"][1]  # SIGKILL: the OOM killer
        assert int((cg / "memory.failcnt").read_text()) > 0

        r, planned = _orch(c, tmp_path, "planned", hosts, ["--fit-memory"])
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        for pid in (cg / "cgroup.procs").read_text().split():
            try:
                (MEMCG_ROOT / home.lstrip("/") / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # gone meanwhile
        deadline = time.monotonic() + 10
        while cg.exists():
            try:
                cg.rmdir()
            except OSError:
                assert time.monotonic() < deadline, f"could not remove {cg}"
                time.sleep(0.1)
    s = summary(planned)
    p0, p1 = s["ranks"][0]["memory_plan"], s["ranks"][1]["memory_plan"]
    assert p0["pieces"] == 1 and p0["budget_source"] != "hostfile memory_gb"
    assert p1["pieces"] >= 2 and p1["budget_source"] == "hostfile memory_gb"
    assert s["ranks"][1]["memory"]["rss_peak_bytes"] <= p1["budget_bytes"]
    assert max_abs_diff(load_arrays(latest_checkpoint(free_dir)), load_arrays(latest_checkpoint(planned))) < 1e-5
