"""The namespace test cluster itself: ring wiring, real sshd, both SSH clients, teardown."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import (
    NetnsCluster,
    NetnsError,
    cleanup_stale,
    make_cluster_fixture,
    netns_cluster,  # noqa: F401  (fixture)
    pids_in_netns,
    require_netns,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(60)]

c4 = make_cluster_fixture(4, scope="module", name="c4")

PY = sys.executable

SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(10)
print("ready", flush=True)
c, peer = s.accept()
c.settimeout(10)
n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    n += len(b)
print(n, peer[0], flush=True)
"""

CLIENT = r"""
import errno, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.sendall(b"x" * int(sys.argv[3]))
    s.close()
    print("ok")
except OSError as e:
    print("err", errno.errorcode.get(e.errno, e.errno) if e.errno else type(e).__name__)
    sys.exit(1)
"""


def _readline(p: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from {p.args} within {timeout}s")
    return p.stdout.readline().strip()


def tcp_send(c: NetnsCluster, src: int, dst: int, dst_ip: str, nbytes: int,
             port: int = 24000) -> tuple[int, str]:
    """Server in host dst on dst_ip:port, client in host src sends nbytes.  Returns
    (bytes received, peer address as seen by the server)."""
    srv = c.popen(dst, [PY, "-c", SERVER, dst_ip, str(port)],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _readline(srv, 10) == "ready", srv.stderr.read() if srv.poll() is not None else ""
        cl = c.exec(src, [PY, "-c", CLIENT, dst_ip, str(port), str(nbytes)], timeout=15)
        assert cl.stdout.strip() == "ok", (cl.stdout, cl.stderr)
        out, err = srv.communicate(timeout=15)
        assert srv.returncode == 0, err
        n, peer = out.split()
        return int(n), peer
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(timeout=5)


def tcp_try(c: NetnsCluster, src: int, ip: str, port: int = 24001) -> str:
    """Connect from host src to ip:port; 'ok' or 'err ENETUNREACH' etc."""
    return c.exec(src, [PY, "-c", CLIENT, ip, str(port), "0"], timeout=15).stdout.strip()


# --------------------------------------------------------------------------- bring-up


def test_cluster_comes_up(c4: NetnsCluster) -> None:
    assert c4.n == 4 and len(c4.hosts) == 4
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for h in c4.hosts:
        assert h.namespace in listed
        assert h.namespace.startswith(f"orch4-{c4.tag}-")
    assert Path(f"/sys/class/net/{c4.bridge}").exists() and len(c4.bridge) <= 15
    assert len(set(c4.sshd_pids)) == 4
    net_ns = {h.namespace: os.stat(f"/run/netns/{h.namespace}").st_ino for h in c4.hosts}
    for h in c4.hosts:
        # sshd runs, is really sshd, and lives in that host's namespace
        assert os.readlink(f"/proc/{h.sshd_pid}/exe") == "/usr/sbin/sshd"
        assert os.stat(f"/proc/{h.sshd_pid}/ns/net").st_ino == net_ns[h.namespace]
        assert h.sshd_pid in pids_in_netns([h.namespace])
        assert c4.exec(h.index, ["hostname"]).stdout.strip() == h.name
        # addresses on the right interfaces
        addrs = c4.exec(h.index, ["ip", "-o", "-4", "addr", "show"]).stdout
        assert f"{c4.hosts[h.index].mgmt_ip}/24" in addrs
        assert any(line.split()[1] == "ring_l" and f"{h.left_ip}/30" in line
                   for line in addrs.splitlines())
        assert any(line.split()[1] == "ring_r" and f"{h.right_ip}/30" in line
                   for line in addrs.splitlines())
        # no default route anywhere inside
        assert "default" not in c4.exec(h.index, ["ip", "route"]).stdout
    # ring geometry: host i's right link is host i+1's left link
    for i, h in enumerate(c4.hosts):
        nxt = c4.hosts[(i + 1) % 4]
        assert h.right_peer_ip == nxt.left_ip and nxt.left_peer_ip == h.right_ip
        assert h.right_link == nxt.left_link == i
    assert c4.hosts[0].mgmt_ip.endswith(".10") and c4.hosts[3].mgmt_ip.endswith(".13")


def test_openssh_client_and_strict_host_keys(c4: NetnsCluster, tmp_path: Path) -> None:
    p = subprocess.run(c4.ssh_argv(2, "hostname"), capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "host2"
    p = subprocess.run(["ssh", "-F", c4.ssh_config_path, "host0", "hostname; id -u"],
                       capture_output=True, text=True, timeout=20)
    assert p.stdout.split() == ["host0", "0"], p.stderr
    # a known_hosts with the wrong key for host2 must make the real client refuse
    keys = Path(c4.known_hosts_path).read_text().splitlines()
    wrong = keys[1].split()  # host1's key ...
    bad = tmp_path / "known_hosts"
    bad.write_text(f"{c4.hosts[2].mgmt_ip},host2 {wrong[1]} {wrong[2]}\n")
    p = subprocess.run(["ssh", "-F", c4.ssh_config_path, "-o", f"UserKnownHostsFile={bad}",
                        "host2", "hostname"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 255 and "host2\n" not in p.stdout
    assert "identification has changed" in p.stderr.lower() or "verification failed" in p.stderr


def test_asyncssh_each_host_strict(c4: NetnsCluster, tmp_path: Path) -> None:
    asyncssh = pytest.importorskip("asyncssh")

    async def run_all() -> list[str]:
        async def one(i: int) -> str:
            async with asyncssh.connect(c4.hosts[i].mgmt_ip, known_hosts=c4.known_hosts_path,
                                        client_keys=[c4.client_key_path], username="root",
                                        config=[], connect_timeout=10) as conn:
                r = await conn.run("hostname", check=True, timeout=10)
                return r.stdout.strip()
        return await asyncio.gather(*(one(i) for i in range(c4.n)))

    assert asyncio.run(run_all()) == [f"host{i}" for i in range(4)]

    async def via_config() -> str:
        async with asyncssh.connect("host3", config=[c4.ssh_config_path],
                                    connect_timeout=10) as conn:
            return (await conn.run("hostname", check=True, timeout=10)).stdout.strip()

    assert asyncio.run(via_config()) == "host3"

    async def helper_kwargs() -> str:
        async with asyncssh.connect(**c4.asyncssh_kwargs(1)) as conn:
            return (await conn.run("hostname", check=True, timeout=10)).stdout.strip()

    assert asyncio.run(helper_kwargs()) == "host1"

    keys = Path(c4.known_hosts_path).read_text().splitlines()
    wrong = keys[0].split()
    bad = tmp_path / "known_hosts"
    bad.write_text(f"{c4.hosts[1].mgmt_ip} {wrong[1]} {wrong[2]}\n")

    async def bad_key() -> None:
        async with asyncssh.connect(c4.hosts[1].mgmt_ip, known_hosts=str(bad),
                                    client_keys=[c4.client_key_path], username="root",
                                    config=[], connect_timeout=10):
            pass

    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        asyncio.run(bad_key())


# --------------------------------------------------------------------------- ring links


def test_ring_neighbours_talk_over_their_link(c4: NetnsCluster) -> None:
    nbytes = 256 * 1024
    for i in range(c4.n):
        j = (i + 1) % c4.n
        before_src = c4.iface_counters(i)
        before_dst = c4.iface_counters(j)
        n, peer = tcp_send(c4, i, j, c4.hosts[j].left_ip, nbytes)
        assert n == nbytes
        assert peer == c4.hosts[i].right_ip  # came in over the ring link, not management
        after_src = c4.iface_counters(i)
        after_dst = c4.iface_counters(j)
        assert after_src["ring_r"]["tx_bytes"] - before_src["ring_r"]["tx_bytes"] >= nbytes
        assert after_dst["ring_l"]["rx_bytes"] - before_dst["ring_l"]["rx_bytes"] >= nbytes
        # the other ring interface of the sender carried (almost) nothing
        assert after_src["ring_l"]["tx_bytes"] - before_src["ring_l"]["tx_bytes"] < 4096


def test_left_neighbour_over_left_link(c4: NetnsCluster) -> None:
    n, peer = tcp_send(c4, 0, 3, c4.hosts[3].right_ip, 1000)
    assert (n, peer) == (1000, c4.hosts[0].left_ip)


def test_nothing_routes_beyond_neighbours(c4: NetnsCluster) -> None:
    # host0 is not cabled to host2: no route to host2's ring addresses
    assert tcp_try(c4, 0, c4.hosts[2].left_ip) == "err ENETUNREACH"
    assert tcp_try(c4, 0, "192.0.2.1") == "err ENETUNREACH"
    assert tcp_try(c4, 0, "8.8.8.8") == "err ENETUNREACH"
    # management LAN reaches every host (sshd answers) ...
    assert tcp_try(c4, 0, c4.hosts[2].mgmt_ip, port=22) == "ok"
    # ... and the root namespace gets 'unreachable' for the rest of the test range
    for ip in (c4.hosts[1].left_ip, "10.213.250.7"):
        s = socket.socket()
        s.settimeout(3)
        with pytest.raises(OSError) as ei:
            s.connect((ip, 22))
        s.close()
        assert ei.value.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH), ei.value
    routes = subprocess.run(["ip", "route", "show", "type", "unreachable"],
                            capture_output=True, text=True).stdout
    assert "10.213.0.0/16" in routes


def test_link_down_breaks_that_link_only(c4: NetnsCluster) -> None:
    target = c4.hosts[2].left_ip  # host1 -> host2 over ring link 1
    try:
        c4.link_down(1)
        assert tcp_try(c4, 1, target) == "err ENETUNREACH"
        assert tcp_try(c4, 2, c4.hosts[1].right_ip) == "err ENETUNREACH"
        n, _ = tcp_send(c4, 2, 3, c4.hosts[3].left_ip, 1000)  # link 2 unaffected
        assert n == 1000
    finally:
        c4.link_up(1)
    deadline = time.monotonic() + 5
    while True:
        try:
            n, _ = tcp_send(c4, 1, 2, target, 1000, port=24002)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert n == 1000


def test_two_hosts_have_two_cables(netns_cluster) -> None:  # noqa: F811
    c = netns_cluster(2, sshd=False)
    h0, h1 = c.hosts
    assert (h0.right_link, h0.left_link) == (0, 1)
    assert h0.right_peer_ip == h1.left_ip and h0.left_peer_ip == h1.right_ip
    assert tcp_send(c, 0, 1, h1.left_ip, 500) == (500, h0.right_ip)
    assert tcp_send(c, 0, 1, h1.right_ip, 500, port=24003) == (500, h0.left_ip)
    assert c.sshd_pids == []
    assert set(c.iface_counters(0)) == {"ring_l", "ring_r"}


# --------------------------------------------------------------------------- teardown


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_teardown_removes_everything_and_kills_strays() -> None:
    require_netns()
    with NetnsCluster(3) as c:
        names, bridge, links = list(c.namespaces), c.bridge, list(c.root_mgmt_links)
        sshd_pids, tmpdir = list(c.sshd_pids), c.tmpdir
        # a process started in a namespace behind the cluster's back ...
        stray = subprocess.Popen(["ip", "netns", "exec", names[0], "sleep", "300"])
        # ... and one left running by an ssh session
        p = subprocess.run(c.ssh_argv(1, "sleep 300 </dev/null >/dev/null 2>&1 & echo $!"),
                           capture_output=True, text=True, timeout=20)
        assert p.returncode == 0, p.stderr
        remote = int(p.stdout.strip())
        assert remote in pids_in_netns([names[1]])
        assert stray.pid in pids_in_netns([names[0]]) or stray.poll() is None
        metric = c._route_metric
    assert stray.wait(timeout=5) != 0
    assert c.leftovers() == []
    assert _pid_gone(remote)
    assert all(_pid_gone(pid) for pid in sshd_pids)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    assert not Path(f"/sys/class/net/{bridge}").exists()
    assert not any(Path(f"/sys/class/net/{d}").exists() for d in links)
    assert not Path(tmpdir).exists()
    routes = subprocess.run(["ip", "route", "show", "type", "unreachable"],
                            capture_output=True, text=True).stdout
    assert f"metric {metric}" not in routes
    c.teardown()  # idempotent


@pytest.mark.parametrize("stage", ["_write_keys_and_configs", "_wait_sshds"])
def test_setup_failure_halfway_cleans_up(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    require_netns()

    def boom(self: NetnsCluster) -> None:
        raise RuntimeError(f"injected failure in {stage}")

    monkeypatch.setattr(NetnsCluster, stage, boom)
    c = NetnsCluster(2)
    with pytest.raises(RuntimeError, match="injected"):
        c.start()
    if stage == "_wait_sshds":
        assert len(c.sshd_pids) == 2  # sshds had been started ...
    assert c.leftovers() == []        # ... and are gone, with everything else
    assert all(_pid_gone(pid) for pid in c.sshd_pids)


def test_sshd_that_cannot_start_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    require_netns()
    orig = NetnsCluster._write_keys_and_configs

    def broken_config(self: NetnsCluster) -> None:
        orig(self)
        cfg = Path(self.hosts[1].sshd_config_path)
        cfg.write_text(cfg.read_text() + "NoSuchOption yes\n")

    monkeypatch.setattr(NetnsCluster, "_write_keys_and_configs", broken_config)
    c = NetnsCluster(2, start_timeout=5)
    with pytest.raises(NetnsError, match="sshd for host1") as ei:
        c.start()
    assert "NoSuchOption" in str(ei.value)  # the sshd log is in the message
    assert c.leftovers() == []


KILLED_OWNER = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from tests.netns import NetnsCluster
c = NetnsCluster(2).start()
print(json.dumps({"namespaces": c.namespaces, "links": [c.bridge, *c.root_mgmt_links],
                  "sshd_pids": c.sshd_pids, "tmpdir": c.tmpdir}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_owner_killed_with_sigkill_is_cleaned_up_later() -> None:
    require_netns()
    repo = str(Path(__file__).resolve().parent.parent)
    p = subprocess.run([PY, "-c", KILLED_OWNER, repo], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == -9, p.stderr
    left = json.loads(p.stdout)
    assert all(Path(f"/run/netns/{ns}").exists() for ns in left["namespaces"])
    assert not any(_pid_gone(pid) for pid in left["sshd_pids"])  # orphans still running
    cleanup_stale()  # (a parallel run may already have cleaned it: that is fine too)
    assert not any(Path(f"/run/netns/{ns}").exists() for ns in left["namespaces"])
    assert not any(Path(f"/sys/class/net/{d}").exists() for d in left["links"])
    assert not Path(left["tmpdir"]).exists()
    deadline = time.monotonic() + 5
    while not all(_pid_gone(pid) for pid in left["sshd_pids"]):
        assert time.monotonic() < deadline, "orphaned sshds survived cleanup_stale()"
        time.sleep(0.05)
