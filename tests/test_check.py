"""`orch check` on this machine and its parts: the probe program, the parsers (recorded Linux and macOS
output), the per-link verdicts, MLX version agreement, the clock, the SSH connector and the CLI contract
(exit 0 / 1 / 2, the JSON shape). The multi-host behaviour is in tests/test_check_cluster.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.probe import probes
from orchestrator.health.collective import expected_speed_note
from orchestrator.health.hosts import host_checks, mlx_agreement, mpi_check
from orchestrator.health.links import Edge, evaluate_link, ring_edges
from orchestrator.health.verdicts import HostResult, LinkResult, Report, render
from orchestrator.probe.runner import describe_probe_exit
from orchestrator.hostfile import Hostfile, Host
from tests.orch_helpers import ROOT, orch_check

MACOS = ROOT / "tests" / "fixtures" / "macos"


def probe_processes() -> list[psutil.Process]:
    """Probes still running anywhere on this machine (their program text is on the command line)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if any("ORCHCHECK " in a for a in cmd):
            out.append(p)
    return out


def assert_json_shape(res: dict) -> None:
    """The documented schema: {"ok", "hosts": [{"host", "checks": [{"name", "ok", "detail"}]}], "links": [...]}."""
    assert isinstance(res["ok"], bool)
    assert isinstance(res["hosts"], list) and res["hosts"]
    for h in res["hosts"]:
        assert isinstance(h["host"], str) and isinstance(h["checks"], list) and h["checks"]
        for c in h["checks"]:
            assert isinstance(c["name"], str) and isinstance(c["ok"], bool) and isinstance(c["detail"], str) and c["detail"]
            assert c["status"] in ("pass", "warn", "fail", "skip") and c["ok"] == (c["status"] in ("pass", "warn"))
    assert isinstance(res["links"], list)
    for l in res["links"]:
        assert {"from", "to", "address", "ok", "detail"} <= set(l)
        assert isinstance(l["ok"], bool) and isinstance(l["detail"], str) and ":" in l["address"]
    assert res["ok"] == (all(c["ok"] for h in res["hosts"] for c in h["checks"]) and all(l["ok"] for l in res["links"])
                         and (res["collective"] is None or res["collective"]["ok"]))


# ----------------------------------------------------------------------------- the command on this machine


def test_local_hostfile_is_all_green_with_the_documented_json(tmp_path):
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "localhost", "ips": ["127.0.0.1"]},
                                        {"ssh": "localhost", "ips": ["127.0.0.1"], "slots": 2}]}))
    t0 = time.monotonic()
    r = orch_check("--hostfile", str(hf), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert_json_shape(res)
    assert res["ok"] and res["world_size"] == 4 and [h["host"] for h in res["hosts"]] == ["127.0.0.1", "localhost", "localhost"]
    names = {c["name"] for c in res["hosts"][0]["checks"]}
    assert {"ssh", "python", "mlx", "disk", "memory", "clock", "ports"} <= names
    assert res["hosts"][0]["checks"][0]["detail"] == "this machine (no SSH)"
    # 4 ranks: 4 ring edges, each to the next rank's planned loopback port, through lo.
    assert [(l["from_rank"], l["to_rank"]) for l in res["links"]] == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert all(l["address"].startswith("127.0.0.1:") and "via lo" in l["detail"] for l in res["links"])
    assert len({l["address"] for l in res["links"]}) == 4
    assert time.monotonic() - t0 < 20
    assert not probe_processes()


def test_local_table_and_starting_port(tmp_path):
    port = 41000 + os.getpid() % 5000
    r = orch_check("-n", "2", "--starting-port", str(port))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout and "✗" not in r.stdout
    assert f"127.0.0.1:{port}" in r.stdout and f"127.0.0.1:{port + 1}" in r.stdout
    assert r.stdout.splitlines()[2].split()[:4] == ["host", "ssh", "python", "mlx"]


@pytest.mark.parametrize("content, needle", [
    ("{not json", "malformed JSON"),
    ('{"hosts": [{"ssh": "a", "ips": ["10.0.0.300"]}]}', "hosts[0].ips: '10.0.0.300' is not an IP address"),
    ('{"hosts": []}', "the host list is empty"),
    # The Thunderbolt rule: neighbours that share no /30 cannot form the ring.
    ('{"hosts": [{"ssh": "a", "ips": ["10.0.0.1/30"]}, {"ssh": "b", "ips": ["10.0.1.1/30"]}]}', "none of its addresses"),
])
def test_a_bad_hostfile_is_one_line_and_exit_2(tmp_path, content, needle):
    hf = tmp_path / "hosts.json"
    hf.write_text(content)
    r = orch_check("--hostfile", str(hf), "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("orch: error: ") and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_missing_hostfile_and_bad_options_exit_2(tmp_path):
    r = orch_check("--hostfile", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "no such hostfile" in r.stderr
    r = orch_check("-n", "2", "--timeout", "0")
    assert r.returncode == 2 and "--timeout 0" in r.stderr
    r = orch_check()
    assert r.returncode == 2 and "needs --hostfile" in r.stderr


def test_a_missing_and_a_hung_python_are_named_and_bounded(tmp_path):
    hung = tmp_path / "python-hangs"
    hung.write_text("#!/bin/sh\nexec sleep 31.4159\n")
    hung.chmod(0o755)
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"hosts": [
        {"ssh": "localhost", "ips": ["127.0.0.1"]},
        {"ssh": "localhost", "ips": ["127.0.0.1"], "python": str(tmp_path / "no-such-python")},
        {"ssh": "localhost", "ips": ["127.0.0.1"], "python": str(hung)},
    ]}))
    t0 = time.monotonic()
    r = orch_check("--hostfile", str(hf), "--json", "--timeout", "2")
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert_json_shape(res)
    py = [{c["name"]: c for c in h["checks"]}["python"] for h in res["hosts"]]
    assert py[0]["ok"] and not py[1]["ok"] and not py[2]["ok"]
    assert py[1]["detail"] == f"{tmp_path / 'no-such-python'}: no such file"
    assert py[2]["detail"].startswith(f"no answer within 2s from {hung}")
    skipped = {c["name"]: c for c in res["hosts"][1]["checks"]}
    assert skipped["mlx"]["status"] == "skip" and not skipped["mlx"]["ok"]
    # Link probes need only the standard library: they still ran, with this interpreter.
    assert all(l["ok"] for l in res["links"]) and len(res["links"]) == 3
    assert took < 15
    assert not [p for p in psutil.process_iter(["cmdline"]) if "31.4159" in (p.info.get("cmdline") or [])]
    assert not probe_processes()


@pytest.mark.slow
def test_local_collective_all_sum(tmp_path):
    r = orch_check("-n", "2", "--collective", "--collective-mib", "1", "--json", timeout=90)
    res = json.loads(r.stdout)
    coll = res["collective"]
    try:
        assert r.returncode == 0, json.dumps(coll) + r.stderr
        assert_json_shape(res)
        assert coll["ok"] and coll["world_size"] == 2 and coll["allsum_bytes"] == 1 << 20
        assert coll["algbw_GBps"] > 0 and coll["busbw_GBps"] == pytest.approx(coll["algbw_GBps"], rel=0.01)  # 2(n-1)/n = 1
        assert coll["latency_us"] > 0 and "result correct" in coll["detail"]
        assert coll["expected"] is None  # no Thunderbolt links in this hostfile
        # The all_sum run is orch check's business: none of its output on the terminal, nothing left behind.
        assert "run directory" not in r.stderr and "succeeded in" not in r.stderr, r.stderr
        assert "run_dir" not in coll
    finally:
        if coll.get("run_dir"):
            import shutil

            shutil.rmtree(Path(coll["run_dir"]).parent, ignore_errors=True)


# ----------------------------------------------------------------------------- the probe program itself


def run_probe(mode: str, cfg: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(probes.probe_argv(sys.executable, mode, cfg), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_host_probe_reports_and_answers_the_clock_until_stdin_closes():
    p = run_probe("host", {"staging": "~/.cache/mlx-orch", "deadline": 30})
    try:
        rep = probes.parse_report(p.stdout.readline())
        assert rep["python"] and rep["system"] == "Linux" and rep["mlx"]["version"]
        assert rep["disk"]["free"] > 0 and rep["memory"]["total"] >= rep["memory"]["available"] > 0
        samples = []
        for _ in range(3):
            sent = time.time()
            p.stdin.write("t\n")
            p.stdin.flush()
            line = p.stdout.readline()
            samples.append((sent, float(line.split()[1]), time.time()))
        off, rtt = probes.clock_offset(samples)
        assert abs(off) < 0.05 and 0 <= rtt < 1
        p.stdin.close()
        assert p.wait(timeout=5) == 0
    finally:
        p.kill()
        p.wait()


def test_listen_probe_names_a_taken_port_and_ends_at_its_deadline():
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    t0 = time.monotonic()
    p = run_probe("listen", {"targets": [{"id": "a", "ip": "127.0.0.1", "port": port},
                                         {"id": "b", "ip": "192.0.2.77", "port": port}], "nonce": "n", "deadline": 1.5})
    try:
        rep = probes.parse_report(p.stdout.readline())
        a, b = rep["bound"]
        assert a["bound"] is False and a["errno"] == 98 and f"pid={os.getpid()}" in (a["holder"] or "")
        assert b["bound"] is False and b["errno"] == 99  # not an address of this machine
        assert p.wait(timeout=10) == 0  # stdin still open: the deadline ends it
        assert time.monotonic() - t0 < 8
    finally:
        held.close()
        p.kill()
        p.wait()


def test_connect_probe_talks_to_the_listener_and_reports_refusals():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    lst = run_probe("listen", {"targets": [{"id": "a", "ip": "127.0.0.1", "port": port}], "nonce": "N0NCE", "deadline": 20})
    try:
        assert probes.parse_report(lst.stdout.readline())["bound"][0]["bound"]
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        c = subprocess.run(probes.probe_argv(sys.executable, "connect", {
            "targets": [{"id": "a", "ip": "127.0.0.1", "port": port, "token": "TOK"},
                        {"id": "b", "ip": "127.0.0.1", "port": closed_port, "token": "x"}],
            "connect_timeout": 2, "deadline": 10}), capture_output=True, text=True, timeout=20)
        ok, refused = probes.parse_report(c.stdout)["results"]
        assert ok["connected"] and ok["reply"] == "N0NCE" and ok["src"] == "127.0.0.1"
        assert probes.parse_route(ok["route"], "Linux").dev == "lo"
        assert not refused["connected"] and refused["errno"] == 111
        accepted = probes.parse_report(lst.stdout.readline())
        assert accepted == {"accepted": "127.0.0.1", "id": "a", "token": "TOK"}
        lst.stdin.close()
        assert lst.wait(timeout=5) == 0
    finally:
        lst.kill()
        lst.wait()


# ----------------------------------------------------------------------------- parsers (recorded output)

# Recorded on this project's Debian 12 test box (iproute2 6.1.0), inside a tests/netns.py host
# and in the root namespace; verbatim except that long lines are split with implicit concatenation.
LINUX_ROUTE_LINK = '[{"dst":"10.213.0.2","dev":"ring_r","prefsrc":"10.213.0.1","flags":[],"uid":0,"cache":[]}]\n'
LINUX_ROUTE_GATEWAY = '[{"dst":"8.8.8.8","gateway":"192.0.2.1","dev":"eth0","prefsrc":"192.0.2.2","flags":[],"uid":0,"cache":[]}]'
LINUX_ROUTE_LOCAL = '[{"type":"local","dst":"127.0.0.1","dev":"lo","prefsrc":"127.0.0.1","flags":[],"uid":0,"cache":["local"]}]'
LINUX_ROUTE_UNREACHABLE = {"rc": 2, "out": "", "err": "RTNETLINK answers: Network is unreachable\n"}
LINUX_ADDRS = (
    '[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"qdisc":"noqueue","operstate":"UNKNOWN",'
    '"group":"default","txqlen":1000,"link_type":"loopback","address":"00:00:00:00:00:00","broadcast":"00:00:00:00:00:00",'
    '"addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo","valid_life_time":4294967295,'
    '"preferred_life_time":4294967295}]},{"ifindex":2,"link_index":642,"ifname":"mgmt0","flags":["BROADCAST","MULTICAST","UP",'
    '"LOWER_UP"],"mtu":1500,"qdisc":"noqueue","operstate":"UP","group":"default","txqlen":1000,"link_type":"ether",'
    '"address":"36:a1:2a:c1:27:35","broadcast":"ff:ff:ff:ff:ff:ff","link_netnsid":1,"addr_info":[{"family":"inet",'
    '"local":"10.213.200.10","prefixlen":24,"scope":"global","label":"mgmt0","valid_life_time":4294967295,'
    '"preferred_life_time":4294967295}]},{"ifindex":3,"link_index":3,"ifname":"ring_r","flags":["BROADCAST","MULTICAST","UP",'
    '"LOWER_UP"],"mtu":1500,"qdisc":"noqueue","operstate":"UP","group":"default","txqlen":1000,"link_type":"ether",'
    '"address":"36:1f:4f:e2:ad:b7","broadcast":"ff:ff:ff:ff:ff:ff","link_netnsid":0,"addr_info":[{"family":"inet",'
    '"local":"10.213.0.1","prefixlen":30,"scope":"global","label":"ring_r","valid_life_time":4294967295,'
    '"preferred_life_time":4294967295}]},{"ifindex":4,"link_index":4,"ifname":"ring_l","flags":["BROADCAST","MULTICAST","UP",'
    '"LOWER_UP"],"mtu":1500,"qdisc":"noqueue","operstate":"UP","group":"default","txqlen":1000,"link_type":"ether",'
    '"address":"2e:e0:40:65:03:83","broadcast":"ff:ff:ff:ff:ff:ff","link_netnsid":0,"addr_info":[{"family":"inet",'
    '"local":"10.213.1.2","prefixlen":30,"scope":"global","label":"ring_l","valid_life_time":4294967295,'
    '"preferred_life_time":4294967295}]}]\n')
# The same host's ring_r after `ip link set ring_r down` (tests/netns.py link_down).
LINUX_RING_R_DOWN = (
    '[{"ifindex":3,"link_index":3,"ifname":"ring_r","flags":["BROADCAST","MULTICAST"],"mtu":1500,"qdisc":"noqueue",'
    '"operstate":"DOWN","group":"default","txqlen":1000,"link_type":"ether","address":"36:1f:4f:e2:ad:b7",'
    '"broadcast":"ff:ff:ff:ff:ff:ff","link_netnsid":0,"addr_info":[{"family":"inet","local":"10.213.0.1","prefixlen":30,'
    '"scope":"global","label":"ring_r","valid_life_time":4294967295,"preferred_life_time":4294967295}]}]\n')


def test_linux_route_get_json():
    r = probes.parse_linux_route(LINUX_ROUTE_LINK)
    assert (r.dev, r.src, r.gateway, r.error) == ("ring_r", "10.213.0.1", None, None)
    r = probes.parse_linux_route(LINUX_ROUTE_GATEWAY)
    assert (r.dev, r.src, r.gateway) == ("eth0", "192.0.2.2", "192.0.2.1")
    assert probes.parse_linux_route(LINUX_ROUTE_LOCAL).dev == "lo"
    r = probes.parse_route(LINUX_ROUTE_UNREACHABLE, "Linux")
    assert r.dev is None and r.error == "Network is unreachable"
    assert probes.parse_route({"rc": None, "out": "", "err": "ip: not found"}, "Linux") is None  # no iproute2 there


@pytest.mark.parametrize("name, dev, gateway, flags", [
    ("route_n_get_default__sierra_10_12__go_sockaddr.txt", "en0", "10.23.9.1", ["UP", "GATEWAY", "DONE", "STATIC", "PRCLONING"]),
    ("route_get_0__en0__neofetch2361.txt", "en0", "10.62.96.1", ["UP", "GATEWAY", "DONE", "STATIC", "PRCLONING", "GLOBAL"]),
    ("route_get_1__utun3_vpn__neofetch2361.txt", "utun3", "192.168.12.1", ["UP", "GATEWAY", "DONE", "STATIC", "PRCLONING", "GLOBAL"]),
])
def test_macos_route_get_recordings(name, dev, gateway, flags):
    """Real `route get` outputs (provenance: tests/fixtures/macos/SOURCES_route.md)."""
    text = (MACOS / name).read_text()
    r = probes.parse_macos_route(text)
    assert (r.dev, r.gateway, r.flags, r.src, r.error) == (dev, gateway, flags, None, None)
    assert probes.parse_route({"rc": 0, "out": text, "err": ""}, "Darwin") == r


def test_macos_route_directly_connected_and_missing():
    # SYNTHETIC: no recording of a route to a directly connected (Thunderbolt) peer was found; this follows the
    # recorded layout with the gateway line left out, as route(8) does for interface routes.
    text = ("   route to: 192.168.0.2\ndestination: 192.168.0.0\n       mask: 255.255.255.252\n  interface: bridge0\n"
            "      flags: <UP,DONE,CLONING>\n recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire\n"
            "       0         0         0         0         0         0      1500         0\n")
    r = probes.parse_macos_route(text)
    assert (r.dev, r.gateway, r.mask, r.flags) == ("bridge0", None, "255.255.255.252", ["UP", "DONE", "CLONING"])
    # SYNTHETIC: a failed lookup (route exits non-zero with a message on stderr).
    r = probes.parse_route({"rc": 1, "out": "", "err": "route: writing to routing socket: not in table\n"}, "Darwin")
    assert r.dev is None and "not in table" in r.error


def test_interfaces_linux_and_macos():
    ifs = {i.name: i for i in probes.parse_linux_addrs(LINUX_ADDRS)}
    assert ifs["ring_r"].up and ifs["ring_r"].addrs == [ipaddress.ip_interface("10.213.0.1/30")]
    assert ifs["ring_r"].on_subnet_of("10.213.0.2") == ipaddress.ip_interface("10.213.0.1/30")
    assert ifs["ring_l"].holds("10.213.1.2") and ifs["ring_l"].on_subnet_of("10.213.0.2") is None
    down = probes.parse_linux_addrs(LINUX_RING_R_DOWN)[0]
    assert not down.up and down.state == "down"
    mac = {i.name: i for i in probes.parse_ifaces(
        {"rc": 0, "out": (MACOS / "ifconfig__intel_mac_4tb_ports_bridge0__citizen_scientist.txt").read_text()}, "Darwin")}
    assert mac["bridge100"].up and mac["bridge100"].on_subnet_of("192.168.64.7") == ipaddress.ip_interface("192.168.64.1/24")
    assert not mac["en1"].up and mac["en1"].state.startswith("inactive")  # a Thunderbolt port with no cable
    assert probes.parse_ifaces({"rc": 1, "out": ""}, "Linux") is None


# ----------------------------------------------------------------------------- per-link verdicts


def edge(ip="10.213.1.2", port=5002, subnet="10.213.1.0/30") -> Edge:
    return Edge(id="e1", from_rank=1, to_rank=2, from_index=1, to_index=2, ip=ip, port=port,
                    subnet=ipaddress.ip_network(subnet) if subnet else None)


NAMES = ["mac0", "mac1", "mac2", "mac3"]
BOUND = {"id": "e1", "bound": True}


def connected(src, route_out, system="Linux", reply="NONCE"):
    return {"id": "e1", "connected": True, "src": src, "reply": reply, "connect_ms": 0.2, "route": {"rc": 0, "out": route_out, "err": ""}}


def test_link_passes_and_names_the_interface():
    route = LINUX_ROUTE_LINK.replace("10.213.0.2", "10.213.1.2").replace("10.213.0.1", "10.213.1.1")
    r = evaluate_link(edge(), NAMES, bind=BOUND, conn=connected("10.213.1.1", route), nonce="NONCE",
                          s_system="Linux", r_system="Linux")
    assert r.ok and r.detail == "mac1 -> mac2 10.213.1.2:5002 via ring_r from 10.213.1.1 (connect 0.20 ms)"
    assert (r.from_host, r.to_host, r.address, r.short) == ("mac1", "mac2", "10.213.1.2:5002", "via ring_r")
    assert r.as_json()["from"] == "mac1" and r.as_json()["ok"] is True


def test_link_through_the_wrong_interface_fails_when_the_hostfile_has_prefixes():
    # Constructed in the recorded shape: the kernel picked the Ethernet port (mgmt0) for a ring address.
    route = '[{"dst":"10.213.1.2","gateway":"10.213.200.12","dev":"mgmt0","prefsrc":"10.213.200.11","flags":[],"uid":0,"cache":[]}]'
    r = evaluate_link(edge(), NAMES, bind=BOUND, conn=connected("10.213.200.11", route), nonce="NONCE",
                          s_system="Linux", r_system="Linux")
    assert not r.ok and r.detail.startswith("route via the wrong interface: mac1 reaches 10.213.1.2:5002 through mgmt0 "
                                            "(source 10.213.200.11, not on 10.213.1.0/30)")
    # Without prefixes there is no expectation: the interface is only named.
    r = evaluate_link(edge(subnet=None), NAMES, bind=BOUND, conn=connected("10.213.200.11", route), nonce="NONCE",
                          s_system="Linux", r_system="Linux")
    assert r.ok and "via mgmt0" in r.detail


def test_macos_link_over_a_vpn_tunnel_is_the_wrong_interface():
    route = (MACOS / "route_get_1__utun3_vpn__neofetch2361.txt").read_text()  # recorded: lands on utun3
    e = edge(ip="192.168.0.2", subnet="192.168.0.0/30")
    r = evaluate_link(e, NAMES, bind=BOUND, conn=connected("10.8.0.2", route), nonce="NONCE",
                          s_system="Darwin", r_system="Darwin")
    assert not r.ok and "through utun3 (source 10.8.0.2, not on 192.168.0.0/30)" in r.detail


@pytest.mark.parametrize("system, in_use, not_avail", [("Linux", 98, 99), ("Darwin", 48, 49)])
def test_listener_failures_port_in_use_and_foreign_address(system, in_use, not_avail):
    holder = 'LISTEN 0 128 10.213.1.2:5002 0.0.0.0:* users:(("python",pid=4892,fd=3))'
    r = evaluate_link(edge(), NAMES, bind={"id": "e1", "bound": False, "errno": in_use, "error": "Address already in use",
                                               "holder": holder}, conn=None, nonce="N", s_system=system, r_system=system)
    assert not r.ok and r.short == "port in use"
    assert r.detail.startswith("port 5002 is already in use on mac2 at 10.213.1.2:5002") and "pid=4892" in r.detail
    r = evaluate_link(edge(), NAMES, bind={"id": "e1", "bound": False, "errno": not_avail, "error": "x"}, conn=None,
                          nonce="N", s_system=system, r_system=system, r_ifaces=probes.parse_linux_addrs(LINUX_ADDRS))
    assert not r.ok and r.detail.startswith("10.213.1.2 is not an address of mac2")


def test_unreachable_address_suggests_the_right_side_and_a_down_link_says_so():
    # The sender (recorded addresses: ring_r 10.213.0.1/30, ring_l 10.213.1.2/30, mgmt0) aims at 10.213.2.1,
    # which the receiver holds; the receiver also holds 10.213.0.2, on the sender's ring_r subnet.
    sender = probes.parse_linux_addrs(LINUX_ADDRS)
    receiver = [probes.Iface("ring_l", True, "up", [ipaddress.ip_interface("10.213.0.2/30")]),
                probes.Iface("ring_r", True, "up", [ipaddress.ip_interface("10.213.2.1/30")])]
    conn = {"id": "e1", "connected": False, "errno": 101, "error": "Network is unreachable", "route": LINUX_ROUTE_UNREACHABLE}
    r = evaluate_link(edge(ip="10.213.2.1", subnet=None), NAMES, bind=BOUND, conn=conn, nonce="N", s_system="Linux",
                          r_system="Linux", s_ifaces=sender, r_ifaces=receiver)
    assert not r.ok and r.short == "unreachable"
    assert r.detail.startswith("mac1 cannot reach mac2 at 10.213.2.1:5002: network unreachable, no route from mac1")
    assert "mac2's addresses on a network mac1 is on: 10.213.0.2 (ring_l)" in r.detail
    # Same target on a cable that is down at the sender: "link down", naming the interface.
    sender_down = [i for i in sender if i.name != "ring_r"] + probes.parse_linux_addrs(LINUX_RING_R_DOWN)
    r = evaluate_link(edge(ip="10.213.0.2", subnet="10.213.0.0/30"), NAMES, bind=BOUND, conn=conn, nonce="N",
                          s_system="Linux", r_system="Linux", s_ifaces=sender_down, r_ifaces=receiver)
    assert not r.ok and r.short == "link down"
    assert r.detail == ("link down: mac1 cannot reach mac2 at 10.213.0.2:5002 (network unreachable); "
                        "mac1's ring_r (10.213.0.1/30) is down")


def test_refused_timeout_wrong_host_and_not_checked():
    base = {"id": "e1", "route": {"rc": 0, "out": LINUX_ROUTE_LINK, "err": ""}}
    r = evaluate_link(edge(), NAMES, bind=BOUND, conn={**base, "connected": False, "errno": 111, "error": "x"},
                          nonce="N", s_system="Linux", r_system="Linux")
    assert r.short == "refused" and "connection refused although rank 2's test listener runs on mac2" in r.detail
    mac_route = {"rc": 0, "out": (MACOS / "route_get_0__en0__neofetch2361.txt").read_text(), "err": ""}
    r = evaluate_link(edge(), NAMES, bind=BOUND, conn={"id": "e1", "route": mac_route, "connected": False, "errno": 60,
                                                           "error": "x"}, nonce="N", s_system="Darwin", r_system="Darwin")
    assert r.short == "timeout" and "no answer (timed out) via en0 gateway 10.62.96.1" in r.detail
    r = evaluate_link(edge(), NAMES, bind=BOUND, conn=connected("10.213.1.1", LINUX_ROUTE_LINK, reply="other"),
                          nonce="N", s_system="Linux", r_system="Linux")
    assert r.short == "wrong host" and not r.ok
    r = evaluate_link(edge(), NAMES, bind=None, conn=None, nonce="N", s_system="Linux", r_system="Linux",
                          not_checked="no listener on mac2 (see mac2's ssh check)")
    assert not r.ok and r.detail == "not checked: no listener on mac2 (see mac2's ssh check)"


def test_ring_edges_follow_the_plan_and_carry_the_hostfile_prefix():
    from orchestrator.plan import plan_job

    hf = Hostfile(hosts=[Host(name=f"mac{i}", ips=ips) for i, ips in enumerate(
        [["192.168.0.1/30", "192.168.0.14/30"], ["192.168.0.2/30", "192.168.0.5/30"],
         ["192.168.0.6/30", "192.168.0.9/30"], ["192.168.0.10/30", "192.168.0.13/30"]])])
    plan = plan_job(hf, "ring", 1, 40000)
    edges = ring_edges(hf, plan)
    assert [(e.from_rank, e.to_rank, e.address, str(e.subnet)) for e in edges] == [
        (0, 1, f"192.168.0.2:{plan.ranks[1].listen[0].split(':')[1]}", "192.168.0.0/30"),
        (1, 2, f"192.168.0.6:{plan.ranks[2].listen[0].split(':')[1]}", "192.168.0.4/30"),
        (2, 3, f"192.168.0.10:{plan.ranks[3].listen[0].split(':')[1]}", "192.168.0.8/30"),
        (3, 0, f"192.168.0.14:{plan.ranks[0].listen[0].split(':')[1]}", "192.168.0.12/30")]
    assert ring_edges(hf, plan_job(hf, "mpi")) == []
    one = Hostfile(hosts=[Host(name="localhost", ips=["127.0.0.1"])])
    assert ring_edges(one, plan_job(one, "ring")) == []


# ----------------------------------------------------------------------------- host verdicts


def hosts4(local=False) -> list[HostResult]:
    return [HostResult(i, f"mac{i}", local) for i in range(4)]


def test_mlx_minority_fails_naming_every_version():
    hosts = hosts4()
    for h in hosts:
        h.add("mlx", "pass", "x")
    mlx_agreement(hosts, {0: "0.32.4", 1: "0.32.4", 2: "0.32.4", 3: "0.31.0"})
    assert [h.checks["mlx"].status for h in hosts] == ["pass", "pass", "pass", "fail"]
    assert hosts[3].checks["mlx"].detail.startswith("mlx 0.31.0 here, but 0.32.4 on mac0, mac1, mac2")
    assert "0.31.0 on mac3" in hosts[3].checks["mlx"].detail
    tie = hosts4()
    mlx_agreement(tie, {0: "0.32.4", 1: "0.32.4", 2: "0.31.0", 3: "0.31.0"})
    assert all(h.checks["mlx"].status == "fail" and "no version has a majority" in h.checks["mlx"].detail for h in tie)
    same = hosts4()
    mlx_agreement(same, {0: "0.32.4", 1: "0.32.4"})
    assert all("mlx" not in h.checks for h in same)


def test_clock_offset_takes_the_fastest_round_trip():
    samples = [(100.0, 105.30, 100.2), (101.0, 106.01, 101.02), (102.0, 107.9, 103.0)]
    off, rtt = probes.clock_offset(samples)
    assert rtt == pytest.approx(0.02) and off == pytest.approx(5.0)
    assert probes.clock_offset([]) is None


REPORT = {"python": "/usr/bin/python3", "python_version": "3.12.1", "system": "Darwin", "machine": "arm64",
          "mlx": {"version": "0.32.4"}, "disk": {"path": "/Users/me", "free": 1 << 30},
          "memory": {"total": 128 << 30, "available": 100 << 30},
          # the recorded M3 Max values (tests/fixtures/macos/mlx_device_info__m3max__mlxc_pr93_example.txt)
          "metal": {"device_name": "Apple M3 Max", "max_recommended_working_set_size": 103079215104,
                    "memory_size": 137438953472}}


def test_host_checks_disk_warning_metal_and_clock_skew():
    h = HostResult(0, "mac0", False)
    host_checks(h, REPORT, [(100.0, 102.5, 100.01)], backend="ring", mpi_local=None, mpi_error=None, mpi_prefix=None)
    c = h.checks
    assert c["disk"].status == "warn" and "under 2 GiB" in c["disk"].detail and c["disk"].ok
    assert c["metal"].status == "pass" and c["metal"].detail == "Metal working set limit 96.0 GiB of 128.0 GiB"
    assert c["clock"].status == "warn" and c["clock"].detail.startswith("offset +2.495 s")
    assert c["python"].ok and c["mlx"].detail == "mlx 0.32.4" and c["memory"].ok
    assert h.ok  # warnings do not fail
    bad = HostResult(1, "mac1", False)
    host_checks(bad, {**REPORT, "mlx": {"error": "ModuleNotFoundError: No module named 'mlx'"}}, [], backend="ring",
                    mpi_local=None, mpi_error=None, mpi_prefix=None)
    assert bad.checks["mlx"].status == "fail" and "No module named 'mlx'" in bad.checks["mlx"].detail
    assert "metal" not in bad.checks and not bad.ok


def test_mpi_check_on_remote_hosts():
    h = HostResult(1, "mac1", False)
    mpi_check(h, {"path": None, "searched": ["/opt/ompi/bin/mpirun"]}, None, None, "/opt/ompi")
    assert h.checks["mpi"].status == "fail" and "--prefix /opt/ompi" in h.checks["mpi"].detail
    mpi_check(h, {"path": "/opt/ompi/bin/mpirun", "version": "mpirun (Open MPI) 5.0.11\n\nReport bugs"}, None, None, "/opt/ompi")
    assert h.checks["mpi"].status == "pass" and h.checks["mpi"].short == "5.0.11"
    mpi_check(h, {"path": "/usr/bin/mpirun", "version": "HYDRA build details:"}, None, None, None)
    assert h.checks["mpi"].status == "fail" and "not Open MPI" in h.checks["mpi"].detail
    mpi_check(h, {}, None, "no Open MPI found for --backend mpi; searched: PATH", None)
    assert h.checks["mpi"].status == "fail" and "this machine" in h.checks["mpi"].detail


def test_probe_exit_words():
    assert describe_probe_exit("python3", 127, "bash: line 1: python3: command not found\n") == \
        "python3: not found on this host (set \"python\" in the hostfile or --python)"
    assert describe_probe_exit("/x/py", 126, "") == "/x/py: not executable"
    assert describe_probe_exit("py", 1, "Traceback...\nMemoryError\n") == "py exited with code 1: MemoryError"


def test_thunderbolt_speed_is_a_note():
    hf = Hostfile(hosts=[Host(name="mac0", links=[{"peer": "mac1", "iface": "en2", "ip": "192.168.0.1"}]), Host(name="mac1")])
    note = expected_speed_note(hf, 2.5)
    assert "40 Gb/s" in note and "80 Gb/s" in note and "50% of 40 Gb/s" in note
    assert expected_speed_note(Hostfile(hosts=[Host(name="a")]), 2.5) is None


def test_render_marks_and_problems():
    hosts = hosts4()
    for h in hosts:
        h.add("ssh", "pass", "ok", "0.4 ms")
    hosts[2].add("mlx", "fail", "MLX is not importable", "not importable")
    hosts[3].add("disk", "warn", "1.0 GiB free", "1.0 GiB free")
    links = [LinkResult(0, 1, "mac0", "mac1", "10.0.0.2:5001", "pass", "via en2", "via en2"),
             LinkResult(1, 2, "mac1", "mac2", "10.0.0.6:5002", "fail", "link down: ...", "link down")]
    text = render(Report(backend="ring", world_size=4, hosts=hosts, links=links))
    assert "✗ not importable" in text and "! 1.0 GiB free" in text
    assert "✗ rank 1 mac1 -> rank 2 mac2  10.0.0.6:5002  link down" in text
    assert "  ✗ mac2 mlx: MLX is not importable" in text and "FAILED (2 failing)" in text


# ----------------------------------------------------------------------------- the SSH connector (in-process server)


def test_connect_hosts_reports_key_status_like_the_launcher(tmp_path):
    from orchestrator.remote.ssh import SSHOptions, close_connections, connect_hosts
    from tests.test_ssh_unit import _Server

    async def go():
        async with _Server(tmp_path) as srv:
            kh = tmp_path / "known_hosts"

            def req(accept_new=False):
                return SSHOptions(ssh_config=str(srv.ssh_config), known_hosts=str(kh),
                                  identity=[str(srv.client_key_path)], accept_new=accept_new, connect_timeout=2)

            hf = Hostfile(hosts=[Host(name="127.0.0.1", port=srv.port), Host(name="127.0.0.1", port=srv.port, slots=2)])
            kh.write_text("")
            refused = await connect_hosts(hf, req(), err=open(os.devnull, "w"))
            accepted = await connect_hosts(hf, req(accept_new=True), err=open(os.devnull, "w"))
            recorded = kh.read_text()
            known = await connect_hosts(hf, req())
            await close_connections(accepted)
            await close_connections(known)
            from orchestrator.remote.ssh import asyncssh

            kh.write_text(srv.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519")))
            changed = await connect_hosts(hf, req(accept_new=True))
            return refused, accepted, known, changed, recorded, srv.known_hosts_line()

    refused, accepted, known, changed, recorded, line = asyncio.run(asyncio.wait_for(go(), 60))
    assert refused[0].key_status == "unknown" and not refused[0].ok and "host key not verifiable" in refused[0].error
    assert accepted[0].key_status == "accepted-new" and accepted[0].conn is not None and recorded == line
    assert accepted[0] is accepted[1]  # one connection per (name, user, port)
    assert known[0].key_status == "known" and known[0].connect_s > 0 and known[0].lost is False
    assert changed[0].key_status == "changed" and "host key CHANGED" in changed[0].error
