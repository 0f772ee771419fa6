"""`orch check` on four network-namespace hosts with real sshd: a healthy ring, then one fault at a time.

Each test runs the real command (``python -m orchestrator.health.check``, what ``orch check`` calls) with
--json, bounds its time, and checks that the failure is reported on the right host or link and nowhere
else, with a non-zero exit. Afterwards nothing of the check may be left running on any host.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.hostfile import load_hostfile
from orchestrator.plan import plan_job
from tests.netns import make_cluster_fixture
from tests.orch_helpers import ROOT, kill_tree

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(120)]

c4 = make_cluster_fixture(4, scope="module", name="c4")
REMOTE_RUNS = Path.home() / ".cache" / "mlx-orch" / "runs"  # the hosts share this filesystem


@pytest.fixture(scope="module", autouse=True)
def _empty_remote_trash():
    yield
    for d in REMOTE_RUNS.glob(".trash-*"):
        shutil.rmtree(d, ignore_errors=True)


def leftovers(c) -> list[tuple[int, str]]:
    return c.running_processes()


@pytest.fixture(autouse=True)
def _clean_between_tests(c4):
    yield
    for i in range(c4.n):
        c4.link_up(i)
    deadline = time.monotonic() + 6
    while leftovers(c4) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = leftovers(c4)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"still running on the hosts after the check: {left}"


def write_hostfile(c, path: Path, per_host: dict | None = None, *, ips=None) -> Path:
    """Like test_multihost: every host lists both ring addresses with their /30 (the planner picks the left one)."""
    hosts = []
    for h in c.hosts:
        entry = {"ssh": h.name, "ips": ips(h) if ips else [f"{h.left_ip}/30", f"{h.right_ip}/30"],
                 "python": sys.executable}
        entry.update((per_host or {}).get(h.index, {}))
        hosts.append(entry)
    path.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    return path


def orch_check_cluster(c, hostfile: Path, *extra: str, timeout: float = 60, as_json: bool = True, known_hosts=None):
    """``orch check --hostfile`` against the namespace cluster ``c`` (its ssh_config and known_hosts):
    (exit code, the parsed JSON or the text, stderr). tests/orch_helpers.orch_check is the local one."""
    argv = [sys.executable, "-m", "orchestrator.health.check", "--hostfile", str(hostfile),
            "--ssh-config", c.ssh_config_path, "--known-hosts", str(known_hosts or c.known_hosts_path), "--timeout", "10",
            *(["--json"] if as_json else []), *extra]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"orch check did not finish in {timeout}s\n{out}\n{err}")
    return p.returncode, (json.loads(out) if as_json else out), err


def checks_of(result: dict) -> dict[str, dict[str, dict]]:
    return {h["host"]: {c["name"]: c for c in h["checks"]} for h in result["hosts"]}


def failing(result: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(host, check) pairs and (from, to) links that failed."""
    hosts = [(h["host"], c["name"]) for h in result["hosts"] for c in h["checks"] if not c["ok"]]
    links = [(l["from"], l["to"]) for l in result["links"] if not l["ok"]]
    return hosts, links


def real_mlx_version() -> str:
    return subprocess.run([sys.executable, "-c", "import mlx.core as mx; print(mx.__version__)"], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


# ----------------------------------------------------------------------------- tests


def test_healthy_ring_passes_every_check(c4, tmp_path):
    c = c4
    t0 = time.monotonic()
    rc, res, err = orch_check_cluster(c, write_hostfile(c, tmp_path / "hosts.json"))
    took = time.monotonic() - t0
    assert rc == 0, json.dumps(res, indent=1) + err
    assert res["ok"] and failing(res) == ([], [])
    checks = checks_of(res)
    assert list(checks) == ["host0", "host1", "host2", "host3"]
    for name, cs in checks.items():
        assert {"ssh", "python", "mlx", "disk", "memory", "clock", "ports"} <= set(cs), cs
        assert "host key known" in cs["ssh"]["detail"]
        assert cs["mlx"]["detail"] == f"mlx {real_mlx_version()}"
        assert cs["clock"]["status"] == "pass"  # one kernel, one clock
    # Every ring edge was tested from the sender to the receiver's left address, through the sender's ring_r.
    assert [(l["from"], l["to"]) for l in res["links"]] == [("host0", "host1"), ("host1", "host2"),
                                                             ("host2", "host3"), ("host3", "host0")]
    for i, l in enumerate(res["links"]):
        nxt = c.hosts[(i + 1) % 4]
        assert l["address"].startswith(f"{nxt.left_ip}:")
        assert f"via ring_r from {c.hosts[i].right_ip}" in l["detail"], l
    assert took < 30

    # The table for people: one row per host, one per link, all ✓.
    rc, text, _ = orch_check_cluster(c, tmp_path / "hosts.json", as_json=False)
    assert rc == 0, text
    assert "✗" not in text and text.count("✓ rank ") == 4 and "all checks passed" in text
    assert all(any(line.startswith(f"host{i} ") for line in text.splitlines()) for i in range(4))


def test_host_keys_known_accepted_and_changed(c4, tmp_path):
    c = c4
    lines = Path(c.known_hosts_path).read_text().splitlines()
    key_of = {l.split()[0].split(",")[1]: " ".join(l.split()[1:3]) for l in lines}
    kh = tmp_path / "known_hosts"  # host1 recorded with another host's key, host3 not at all
    kh.write_text("\n".join(l.replace(key_of["host1"], key_of["host0"]) if "host1" in l else l
                            for l in lines if "host3" not in l) + "\n")
    rc, res, err = orch_check_cluster(c, write_hostfile(c, tmp_path / "hosts.json"), "--ssh-accept-new", known_hosts=kh)
    assert rc == 1
    hosts, links = failing(res)
    assert ("host1", "ssh") in hosts and all(h == "host1" for h, _ in hosts)
    assert links == [("host0", "host1"), ("host1", "host2")]
    checks = checks_of(res)
    assert "host key CHANGED" in checks["host1"]["ssh"]["detail"]
    assert "host key known" in checks["host0"]["ssh"]["detail"] and "host key known" in checks["host2"]["ssh"]["detail"]
    assert "new host key accepted and recorded" in checks["host3"]["ssh"]["detail"]
    assert key_of["host3"] in kh.read_text() and "trusted a new host key" in err
    assert all("not checked" in l["detail"] and "host1's ssh check" in l["detail"] for l in res["links"] if not l["ok"])


def test_a_downed_link_fails_that_link_only(c4, tmp_path):
    c = c4
    c.link_down(1)  # the cable between host1 and host2
    try:
        rc, res, _ = orch_check_cluster(c, write_hostfile(c, tmp_path / "hosts.json"))
    finally:
        c.link_up(1)
    assert rc == 1 and not res["ok"]
    hosts, links = failing(res)
    assert links == [("host1", "host2")] and hosts == []
    bad = next(l for l in res["links"] if not l["ok"])
    assert bad["address"].startswith(f"{c.hosts[2].left_ip}:") and bad["from_rank"] == 1 and bad["to_rank"] == 2
    assert bad["detail"].startswith("link down: host1 cannot reach host2")
    assert "ring_r" in bad["detail"] and "is down" in bad["detail"]


def test_a_wrong_side_address_fails_the_link_into_that_host(c4, tmp_path):
    c = c4
    # No prefixes: every host lists one address, host2 the one on its cable to host3 instead of host1.
    hf = write_hostfile(c, tmp_path / "hosts.json", ips=lambda h: [h.right_ip if h.index == 2 else h.left_ip])
    rc, res, _ = orch_check_cluster(c, hf)
    assert rc == 1
    hosts, links = failing(res)
    assert links == [("host1", "host2")] and hosts == []
    bad = next(l for l in res["links"] if not l["ok"])
    assert bad["address"].startswith(f"{c.hosts[2].right_ip}:")
    assert "host1 cannot reach host2" in bad["detail"] and "network unreachable" in bad["detail"]
    # ... and it says which of host2's addresses host1 could reach.
    assert f"{c.hosts[2].left_ip} (ring_l)" in bad["detail"]


def test_a_route_through_the_wrong_interface_is_named(c4, tmp_path):
    """host1 reaches host2's ring address over the management LAN (as a Mac might over Ethernet instead of the cable)."""
    c = c4
    target = c.hosts[2].left_ip
    c.exec(1, ["ip", "route", "add", f"{target}/32", "via", c.hosts[2].mgmt_ip, "dev", "mgmt0"], check=True)
    try:
        rc, res, _ = orch_check_cluster(c, write_hostfile(c, tmp_path / "hosts.json"))
    finally:
        c.exec(1, ["ip", "route", "del", f"{target}/32"])
    assert rc == 1
    hosts, links = failing(res)
    assert links == [("host1", "host2")] and hosts == []
    bad = next(l for l in res["links"] if not l["ok"])
    assert bad["detail"].startswith(f"route via the wrong interface: host1 reaches {target}:"), bad
    assert f"through mgmt0 (source {c.hosts[1].mgmt_ip}, not on {target.rsplit('.', 1)[0]}.0/30)" in bad["detail"]


def test_a_port_in_use_is_reported_on_that_host_and_link(c4, tmp_path):
    c = c4
    hf = write_hostfile(c, tmp_path / "hosts.json")
    port0 = random.randrange(30000, 50000)
    plan = plan_job(load_hostfile(hf), "ring", 1, port0)
    ip, port = plan.ranks[2].listen[0].split(":")
    holder = c.popen(2, [sys.executable, "-c", "import socket, sys, time\n"
                         "s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
                         "print('ready', flush=True); time.sleep(60)", ip, port],
                     stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        rc, res, _ = orch_check_cluster(c, hf, "--starting-port", str(port0))
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert rc == 1
    hosts, links = failing(res)
    assert hosts == [("host2", "ports")] and links == [("host1", "host2")]
    ports = checks_of(res)["host2"]["ports"]
    assert f"{ip}:{port}" in ports["detail"] and "address already in use" in ports["detail"]
    link = next(l for l in res["links"] if not l["ok"])
    assert link["address"] == f"{ip}:{port}" and f"port {port} is already in use on host2" in link["detail"]
    assert f"pid={holder.pid}" in link["detail"]  # ss names the process holding it


def test_a_python_without_mlx_fails_mlx_on_that_host(c4, tmp_path):
    c = c4
    shim = tmp_path / "python-no-site"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # no site-packages: no MLX
    shim.chmod(0o755)
    assert subprocess.run([str(shim), "-c", "import mlx"], capture_output=True, timeout=30).returncode != 0
    rc, res, _ = orch_check_cluster(c, write_hostfile(c, tmp_path / "hosts.json", {1: {"python": str(shim)}}))
    assert rc == 1
    hosts, links = failing(res)
    assert hosts == [("host1", "mlx")] and links == []
    mlx = checks_of(res)["host1"]["mlx"]
    assert "MLX is not importable" in mlx["detail"] and "No module named 'mlx'" in mlx["detail"]


def test_an_mlx_version_mismatch_names_the_host_and_both_versions(c4, tmp_path):
    c = c4
    fake = tmp_path / "fake"
    (fake / "mlx").mkdir(parents=True)
    (fake / "mlx" / "__init__.py").write_text("")
    (fake / "mlx" / "core.py").write_text('__version__ = "0.0.1-fake"\n')
    shim = tmp_path / "python-fake-mlx"
    shim.write_text(f"#!/bin/sh\nexport PYTHONPATH={fake}\nexec {sys.executable} \"$@\"\n")
    shim.chmod(0o755)
    rc, res, _ = orch_check_cluster(c, write_hostfile(c, tmp_path / "hosts.json", {3: {"python": str(shim)}}))
    assert rc == 1
    hosts, links = failing(res)
    assert hosts == [("host3", "mlx")] and links == []
    detail = checks_of(res)["host3"]["mlx"]["detail"]
    real = real_mlx_version()
    assert detail.startswith(f"mlx 0.0.1-fake here, but {real} on host0, host1, host2"), detail
    assert "0.0.1-fake on host3" in detail


def test_collective_all_sum_over_four_hosts(c4, tmp_path):
    c = c4
    rc, res, err = orch_check_cluster(c, write_hostfile(c, tmp_path / "hosts.json"), "--collective",
                                      "--collective-mib", "4", timeout=100)
    coll = res["collective"]
    try:
        assert rc == 0, json.dumps(coll, indent=1) + err[-3000:]
        assert coll["ok"] and coll["world_size"] == 4 and coll["allsum_bytes"] == 4 << 20
        assert coll["algbw_GBps"] > 0 and coll["busbw_GBps"] == pytest.approx(coll["algbw_GBps"] * 1.5, rel=0.01)
        assert coll["latency_us"] > 0 and coll["latency_iters"] == 50
        assert "result correct" in coll["detail"]
    finally:
        if coll and coll.get("run_dir"):
            shutil.rmtree(Path(coll["run_dir"]).parent, ignore_errors=True)
