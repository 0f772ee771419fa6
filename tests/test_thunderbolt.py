"""Thunderbolt topology, networksetup/ifconfig and Metal-info parsing.

Real recordings live in tests/fixtures/macos/ (provenance: SOURCES.md there). Setups that
no recording covers (3 and 4 Macs, broken rings, double cables) are SYNTHETIC: built by
``synthetic_hosts`` below from the real M5 Max MacBook Pro capture, by rewriting UUIDs
and re-pointing ``_items`` (see tests/fixtures/macos/SYNTHETIC.md).
"""

from __future__ import annotations

import ast
import copy
import ipaddress
import json
import re
from pathlib import Path

import pytest

from orchestrator.probe.macos import (
    parse_hardware_ports,
    parse_ifconfig,
    parse_metal_device_info,
    thunderbolt_devices,
)
from orchestrator.health.thunderbolt import (
    NoRingError,
    TopologyError,
    build_cable_graph,
    find_ring,
    plan_thunderbolt_ring,
)
from orchestrator.health.thunderbolt_host import find_peer_mac, parse_host, parse_sp_thunderbolt

FIX = Path(__file__).parent / "fixtures" / "macos"
MBP_JSON = FIX / "sp_thunderbolt_json__m5max_mbp__tb5_peer_m3ultra_studio__omlxplus.json"
STUDIO_JSON = (
    FIX / "sp_thunderbolt_json__m3ultra_studio__tb5_peer_m5max_mbp_plus_owc_drive__omlxplus.json"
)
MINI_TEXT = FIX / "sp_thunderbolt_text__macmini_tb5_peer_macstudio__exo1390_partial.txt"
PYREPR_ITEM = FIX / "sp_thunderbolt_items_pyrepr__macstudio_m3ultra_peer__mlx2538_partial.txt"
NS_MBP14 = FIX / "networksetup_listallhardwareports__mbp14_2021__alfred20_partial.txt"
NS_2020 = FIX / "networksetup_listallhardwareports__mac_2020__nonocast129.txt"

MBP_UUID_BUS0 = "817DCFA4-B481-4100-80FC-91C7AA969F0B"
STUDIO_UUID_BUS1 = "28CA4C30-A263-4C55-B302-953416D0B209"


def read(p: Path) -> str:
    return p.read_text()


# ---------------------------------------------------------------------------------------
# SYNTHETIC topologies, derived from the real MBP capture


def synthetic_hosts(n: int, cables: list[tuple[tuple[int, str], tuple[int, str]]]) -> dict:
    """SYNTHETIC (not a recording): n Macs "mac0".."mac{n-1}", each a copy of the real
    M5 Max MBP system_profiler JSON (receptacles 1-3) with every bus's domain/switch UID
    rewritten to an obviously fake value and all ``_items`` removed; then, per cable
    ((host, receptacle), (host, receptacle)), both buses get the real peer item (copied
    from the MBP's bus_0) re-pointed at the other end's fake UUID, and the real connected
    receptacle tag. networksetup is the real 2021 MBP 14 recording (Thunderbolt 1-3 =
    en1-en3, bridge0) for every host.
    """
    real = json.loads(read(MBP_JSON))
    buses = real["SPThunderboltDataType"]
    connected = next(b for b in buses if b.get("_items"))
    peer_item, connected_tag = connected["_items"][0], connected["receptacle_1_tag"]
    empty_tag = next(b for b in buses if not b.get("_items"))["receptacle_1_tag"]

    def uuid(i: int, rec: str) -> str:
        return f"5EED{i:04X}-0000-4000-8000-{int(rec):012X}"

    docs = []
    for i in range(n):
        d = copy.deepcopy(real)
        for b in d["SPThunderboltDataType"]:
            rec = b["receptacle_1_tag"]["receptacle_id_key"]
            b.pop("_items", None)
            b["domain_uuid_key"] = uuid(i, rec)
            b["switch_uid_key"] = f"0x5EED{i:011X}{rec}"
            b["receptacle_1_tag"] = {**empty_tag, "receptacle_id_key": rec}
        docs.append(d)

    def bus(i: int, rec: str) -> dict:
        return next(b for b in docs[i]["SPThunderboltDataType"]
                    if b["receptacle_1_tag"]["receptacle_id_key"] == rec)

    for (i, ri), (j, rj) in cables:
        for (x, rx), (y, ry) in (((i, ri), (j, rj)), ((j, rj), (i, ri))):
            b = bus(x, rx)
            b["receptacle_1_tag"] = {**connected_tag, "receptacle_id_key": rx}
            b.setdefault("_items", []).append(
                {**copy.deepcopy(peer_item), "_name": "MacBook Pro",
                 "device_name_key": "Mac17,7", "domain_uuid_key": uuid(y, ry)})
    ns = read(NS_MBP14)
    return {f"mac{i}": (json.dumps(d), ns) for i, d in enumerate(docs)}


# receptacle N -> enN in the alfred20 networksetup recording
RING3 = [((0, "1"), (1, "1")), ((1, "2"), (2, "3")), ((2, "1"), (0, "2"))]
# cabled 0-2-1-3-0 so the input order is not the ring order
RING4 = [((0, "1"), (2, "2")), ((2, "3"), (1, "2")), ((1, "1"), (3, "3")), ((3, "1"), (0, "3"))]
CHAIN4 = [((0, "1"), (1, "2")), ((1, "3"), (2, "1")), ((2, "2"), (3, "3"))]  # no 3-0 cable


def configured(commands: list[str]) -> dict[str, str]:
    """{iface: ip} from the ifconfig commands of one host (independent of the plan's model)."""
    out = {}
    for c in commands:
        m = re.fullmatch(r"sudo ifconfig (en\d+) inet (\S+) netmask 255\.255\.255\.252", c)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def check_plan(plan, cables):
    """Every invariant a ring plan must satisfy, checked against the cable spec."""
    ring, hosts = plan.ring, plan.hostfile["hosts"]
    n = len(ring)
    assert [h["ssh"] for h in hosts] == ring
    cfg = {h: configured(cmds) for h, cmds in plan.commands.items()}
    # the ifaces each host configures are exactly its cabled receptacles (N -> enN)
    for h in ring:
        i = int(h[3:])
        recs = {r for end in cables for (x, r) in end if x == i}
        assert set(cfg[h]) == {f"en{r}" for r in recs}
    # every /30 distinct, both ends in it, every address distinct
    all_ips = [ip for c in cfg.values() for ip in c.values()]
    assert len(all_ips) == len(set(all_ips)) == 2 * len(cables)
    nets = {ipaddress.IPv4Interface(f"{ip}/30").network for ip in all_ips}
    assert len(nets) == len(cables)
    for (i, ri), (j, rj) in cables:
        a, b = cfg[f"mac{i}"][f"en{ri}"], cfg[f"mac{j}"][f"en{rj}"]
        assert ipaddress.ip_interface(f"{a}/30").network == ipaddress.ip_interface(
            f"{b}/30").network
    # consecutive ranks are cabled
    cabled = {frozenset((f"mac{i}", f"mac{j}")) for (i, _), (j, _) in cables}
    assert all(frozenset((ring[k], ring[(k + 1) % n])) in cabled for k in range(n))
    # rank i listens on its address on the cable to rank i-1
    for k, h in enumerate(hosts):
        left = ring[k - 1]
        assert len(h["ips"]) == 1
        ip = h["ips"][0]
        assert ip in cfg[h["ssh"]].values()
        net = ipaddress.IPv4Interface(f"{ip}/30").network
        assert any(ipaddress.IPv4Address(x) in net for x in cfg[left].values())
        # and that neighbour's route to it goes out the cable's interface
        iface = next(f for f, x in cfg[left].items() if ipaddress.IPv4Address(x) in net)
        assert f"sudo route change {ip} -interface {iface}" in plan.commands[left]
    # the extra "links" field lists every cable of the host with its /30
    for h in hosts:
        assert sorted(ln["iface"] for ln in h["links"]) == sorted(cfg[h["ssh"]])
        assert all(ln["ip"].endswith("/30") for ln in h["links"])


# ---------------------------------------------------------------------------------------
# system_profiler, real recordings


def test_parse_mbp_json():
    host = parse_host(read(MBP_JSON))
    assert host.name == "MacBook Pro"
    assert [p.receptacle for p in host.ports] == ["1", "2", "3"]
    cabled = [p for p in host.ports if p.peer]
    assert len(cabled) == 1
    p = cabled[0]
    assert (p.bus, p.domain_uuid, p.switch_uid) == (
        "thunderboltusb4_bus_0", MBP_UUID_BUS0, "0x05ACBE5E06781980")
    assert (p.peer.domain_uuid, p.peer.name, p.peer.model) == (
        STUDIO_UUID_BUS1, "Mac Studio", "Mac15,14")
    assert p.speed == "80 Gb/s"
    assert host.ports[1].speed == "Up to 120 Gb/s" and host.ports[1].peer is None


def test_parse_studio_json_skips_drive():
    host = parse_sp_thunderbolt(json.loads(read(STUDIO_JSON)))
    assert host.name == "Mac Studio"
    assert [p.receptacle for p in host.ports] == ["1", "2", "3", "4", "5", "6"]
    by_rec = {p.receptacle: p for p in host.ports}
    assert by_rec["2"].peer.domain_uuid == MBP_UUID_BUS0
    assert (by_rec["2"].peer.name, by_rec["2"].peer.model) == ("MacBook Pro", "Mac17,7")
    # the OWC drive on receptacle 4 is connected but is not a Mac
    assert by_rec["4"].status == "receptacle_connected"
    assert by_rec["4"].peer is None and by_rec["4"].devices == ["Envoy Ultra"]
    assert [p.receptacle for p in host.ports if p.peer] == ["2"]


def test_entry_without_domain_uuid_is_skipped():
    # SYNTHETIC edit of the real Studio JSON: drop one bus's domain_uuid_key (as some
    # accessories appear, ml-explore/mlx#2682)
    d = json.loads(read(STUDIO_JSON))
    del d["SPThunderboltDataType"][0]["domain_uuid_key"]  # bus_5, receptacle 6
    assert [p.receptacle for p in parse_host(d).ports] == ["1", "2", "3", "4", "5"]


def test_parse_text_form_macmini():
    host = parse_host(read(MINI_TEXT))
    assert host.name == "Mac mini"
    assert len(host.ports) == 2
    p = host.ports[0]
    assert (p.bus, p.receptacle, p.speed, p.switch_uid) == (
        "thunderboltusb4_bus_2", "3", "80 Gb/s", "0x05AC897E0A474D02")
    assert p.domain_uuid == "7F158861-C131-4D0D-83B6-CA50EF76C32B"
    assert (p.peer.name, p.peer.model, p.peer.domain_uuid) == (
        "Mac Studio", "Mac16,9", "88F10ACA-5CAA-4F5D-8361-03EED54ACB5A")
    # bus 1 is cut off in the recording after its Domain UUID: no port block
    q = host.ports[1]
    assert q.domain_uuid == "0A3248FD-13DA-4F5B-9167-7C469F35421C"
    assert q.receptacle is None and q.peer is None


def test_find_peer_in_real_item_and_behind_hub():
    line = next(ln for ln in read(PYREPR_ITEM).splitlines() if ln.startswith("{"))
    item = ast.literal_eval(line)
    peer = find_peer_mac([item])
    assert (peer.domain_uuid, peer.name, peer.model) == (
        "25C26CAB-7A82-49BA-BCB1-BD06ADFA7742", "Mac Studio", "Mac15,14")
    # SYNTHETIC: the same real item nested behind a hub entry (exo-explore/exo#1982 shape)
    hub = {"_name": "Hub", "vendor_name_key": "Hub Vendor", "_items": [item]}
    assert find_peer_mac([hub]).domain_uuid == peer.domain_uuid
    assert find_peer_mac([{"_name": "Envoy Ultra"}]) is None


# ---------------------------------------------------------------------------------------
# networksetup, ifconfig


def test_networksetup_mbp14():
    ports = parse_hardware_ports(read(NS_MBP14))
    assert thunderbolt_devices(ports) == {"1": "en1", "2": "en2", "3": "en3"}
    assert ports["Thunderbolt Bridge"] == "bridge0"
    assert ports["AX88179A"] == "en8" and ports["Ethernet Adapter (en6)"] == "en6"
    assert ports["Wi-Fi"] == "en0"


def test_networksetup_2020():
    ports = parse_hardware_ports(read(NS_2020))
    assert thunderbolt_devices(ports) == {"1": "en1", "2": "en2"}
    assert ports["iPhone USB"] == "en5" and ports["Bluetooth PAN"] == "en3"
    assert len(ports) == 6


def test_parse_host_maps_ifaces_and_bridge():
    host = parse_host(read(STUDIO_JSON), read(NS_2020))
    # receptacles 3-6 have no "Thunderbolt N" in this (2-port) networksetup
    assert {p.receptacle: p.iface for p in host.ports} == {
        "1": "en1", "2": "en2", "3": None, "4": None, "5": None, "6": None}
    assert host.bridge == "bridge0"


def test_ifconfig_bridge_with_four_thunderbolt_members():
    ifs = parse_ifconfig(
        read(FIX / "ifconfig__intel_mac_4tb_ports_bridge0__citizen_scientist.txt"))
    assert ifs["bridge0"].members == ["en1", "en2", "en3", "en4"]
    assert ifs["bridge0"].status == "inactive" and ifs["bridge0"].inet == []
    assert ifs["bridge100"].inet == [ipaddress.IPv4Interface("192.168.64.1/24")]
    assert ifs["bridge100"].members == ["en10"] and ifs["bridge100"].active
    assert ifs["lo0"].inet == [ipaddress.IPv4Interface("127.0.0.1/8")]
    assert ifs["en3"].ether == "d2:00:a0:43:10:01" and "PROMISC" in ifs["en3"].flags
    assert ifs["en8"].active and ifs["en8"].mtu == 1500
    assert ifs["stf0"].flags == [] and not ifs["stf0"].up
    assert len(ifs) == 17


def test_ifconfig_apple_silicon_and_verbose():
    ifs = parse_ifconfig(
        read(FIX / "ifconfig_a__mbp16_apple_silicon_sonoma14_4__glpi673_partial.txt"))
    assert list(ifs) == ["lo0", "gif0", "stf0", "anpi1", "anpi0", "en4", "en5", "en1"]
    assert ifs["en1"].ether == "36:00:07:a1:00:00" and ifs["en1"].status == "inactive"
    v = parse_ifconfig(
        read(FIX / "ifconfig_v__ip_over_thunderbolt_en2_bridge0__iproute2mac56_fragment.txt"))
    assert v["en2"].type == "IP over Thunderbolt" and v["en2"].mtu == 1500
    assert v["bridge0"].type is None and v["bridge0"].ether == "36:32:70:3f:d9:00"


# ---------------------------------------------------------------------------------------
# Metal device info


def test_metal_device_info_pr1060_has_no_memory_size():
    m = parse_metal_device_info(read(FIX / "mx_metal_device_info__mlx_pr1060.txt"))
    assert m.max_recommended_working_set_size == 188743680000
    assert m.memory_size is None


def test_metal_device_info_m3max_text_and_dict():
    m = parse_metal_device_info(read(FIX / "mlx_device_info__m3max__mlxc_pr93_example.txt"))
    assert (m.memory_size, m.max_recommended_working_set_size) == (137438953472, 103079215104)
    d = parse_metal_device_info({"memory_size": 137438953472, "architecture": "applegpu_g15s"})
    assert d.memory_size == 137438953472 and d.max_recommended_working_set_size is None
    with pytest.raises(ValueError):
        parse_metal_device_info("MLX version: 0.30.4\nGPU device count: 1")


# ---------------------------------------------------------------------------------------
# Cable graph and ring


def test_real_tb5_pair_is_one_cable_and_a_ring():
    g = build_cable_graph({"mbp": (read(MBP_JSON), None), "studio": (read(STUDIO_JSON), None)})
    assert len(g.cables) == 1 and g.strays == []
    c = g.cables[0]
    ends = {e.host: e for e in (c.a, c.b)}
    assert (ends["mbp"].bus, ends["mbp"].receptacle, ends["mbp"].domain_uuid) == (
        "thunderboltusb4_bus_0", "1", MBP_UUID_BUS0)
    assert (ends["studio"].bus, ends["studio"].receptacle, ends["studio"].domain_uuid) == (
        "thunderboltusb4_bus_1", "2", STUDIO_UUID_BUS1)
    assert c.both_ends and c.speed == "80 Gb/s"
    r = find_ring(g)
    assert r.ring == ["mbp", "studio"] and r.cables_per_hop == 1


def test_real_tb5_pair_plan():
    # real system_profiler pair; networksetup is the real MBP-14 recording standing in for
    # both machines (SYNTHETIC pairing: no networksetup of these two Macs was recorded)
    plan = plan_thunderbolt_ring({"studio": (read(STUDIO_JSON), read(NS_MBP14)),
                                  "mbp": (read(MBP_JSON), read(NS_MBP14))})
    assert plan.ring == ["studio", "mbp"]
    assert configured(plan.commands["studio"]) == {"en2": "192.168.0.1"}
    assert configured(plan.commands["mbp"]) == {"en1": "192.168.0.2"}
    assert plan.commands["mbp"][0] == "sudo ifconfig bridge0 down"
    assert plan.hostfile == {
        "backend": "ring", "envs": [],
        "hosts": [
            {"ssh": "studio", "ips": ["192.168.0.1"],
             "links": [{"peer": "mbp", "iface": "en2", "ip": "192.168.0.1/30"}]},
            {"ssh": "mbp", "ips": ["192.168.0.2"],
             "links": [{"peer": "studio", "iface": "en1", "ip": "192.168.0.2/30"}]},
        ],
    }


def test_same_output_twice_is_rejected():
    with pytest.raises(TopologyError, match="same system_profiler output"):
        build_cable_graph({"a": (read(MBP_JSON), None), "b": (read(MBP_JSON), None)})


def test_missing_iface_for_ring_port_is_named():
    # real pair (cable on MBP receptacle 1 <-> Studio receptacle 2) with a SYNTHETIC
    # minimal networksetup that knows only "Thunderbolt 1": the Studio end has no enX
    ns_one_port = "Hardware Port: Thunderbolt 1\nDevice: en1\n"
    with pytest.raises(TopologyError, match="studio Thunderbolt 2"):
        plan_thunderbolt_ring({"mbp": (read(MBP_JSON), ns_one_port),
                               "studio": (read(STUDIO_JSON), ns_one_port)})


def test_synthetic_3_ring():
    plan = plan_thunderbolt_ring(synthetic_hosts(3, RING3))
    assert plan.ring[0] == "mac0" and sorted(plan.ring) == ["mac0", "mac1", "mac2"]
    check_plan(plan, RING3)


def test_synthetic_4_ring_out_of_input_order():
    hosts = synthetic_hosts(4, RING4)
    plan = plan_thunderbolt_ring(hosts)
    assert plan.ring in (["mac0", "mac2", "mac1", "mac3"], ["mac0", "mac3", "mac1", "mac2"])
    check_plan(plan, RING4)
    # a different base moves every address into it
    other = plan_thunderbolt_ring(hosts, base="10.77.0.0")
    assert all(ln.network.startswith("10.77.0.") for ln in other.links)


def test_synthetic_4_ring_with_extra_cable_addresses_it_but_keeps_ring_ips():
    cables = RING4 + [((0, "2"), (1, "3"))]  # a diagonal cable, not on the ring
    plan = plan_thunderbolt_ring(synthetic_hosts(4, cables))
    assert len(plan.links) == 5
    check_plan(plan, cables)


def test_two_hosts_two_cables_use_both():
    cables = [((0, "1"), (1, "2")), ((0, "3"), (1, "1"))]
    plan = plan_thunderbolt_ring(synthetic_hosts(2, cables))
    hosts = {h["ssh"]: h for h in plan.hostfile["hosts"]}
    assert set(hosts["mac0"]["ips"]) == set(configured(plan.commands["mac0"]).values())
    assert set(hosts["mac1"]["ips"]) == set(configured(plan.commands["mac1"]).values())
    assert len(hosts["mac0"]["ips"]) == len(hosts["mac1"]["ips"]) == 2


def test_broken_4_chain_names_missing_cable():
    g = build_cable_graph(synthetic_hosts(4, CHAIN4))
    r = find_ring(g)
    assert not r.ok and r.ring is None
    assert r.missing == [("mac3", "mac0")]
    assert "missing a cable between mac3 and mac0" in r.message
    assert "mac0 has 1 Thunderbolt cable to the other hosts (needs 2)" in r.message
    assert "mac3 has 1 Thunderbolt cable" in r.message
    assert "mac1 has" not in r.message and "mac2 has" not in r.message
    with pytest.raises(NoRingError) as e:
        plan_thunderbolt_ring(g)
    assert e.value.search.missing == [("mac3", "mac0")]


def test_cable_to_mac_outside_host_list_is_reported():
    # real MBP (cabled to a Studio not listed) + one SYNTHETIC Mac with no cables
    lone = synthetic_hosts(1, [])["mac0"]
    g = build_cable_graph({"mbp": (read(MBP_JSON), read(NS_MBP14)), "mac0": lone})
    assert g.cables == [] and len(g.strays) == 1
    r = find_ring(g)
    assert not r.ok
    assert "missing a cable between mbp and mac0" in r.message
    assert "mbp Thunderbolt 1 (en1) is cabled to a Mac that is not a host" in r.message
    assert STUDIO_UUID_BUS1 in r.message and "Mac15,14" in r.message


def test_ring_needs_two_hosts():
    with pytest.raises(TopologyError):
        find_ring(build_cable_graph({"mbp": (read(MBP_JSON), None)}))
