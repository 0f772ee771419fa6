"""The JACCL checks' parsers and verdicts against real recorded macOS output (tests/fixtures/macos/SOURCES.md),
and the probe program (orchestrator/probe/probe_host.py) run for real with its macOS branch forced on Linux.

Combining recordings of different Macs into one host (e.g. the M3 Ultra Studio's system_profiler with the
MacBook Pro's networksetup) is SYNTHETIC; each output itself is a real recording, none is edited.
"""

from __future__ import annotations

import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.probe import probe_host, probes
from orchestrator.health.jaccl_checks import (Unreadable, build_agreement, device_names, jaccl_host_checks, link_gbps,
                                              parse_ibv_devices, parse_macos_version, parse_rdma_ctl_status, read_macos)
from orchestrator.health.verdicts import HostResult
from tests.orch_helpers import orch_check

FIX = Path(__file__).parent / "fixtures" / "macos"
STUDIO_SP = "sp_thunderbolt_json__m3ultra_studio__tb5_peer_m5max_mbp_plus_owc_drive__omlxplus.json"
MBP_SP = "sp_thunderbolt_json__m5max_mbp__tb5_peer_m3ultra_studio__omlxplus.json"
NETWORKSETUP = "networksetup_listallhardwareports__mbp14_2021__alfred20_partial.txt"  # Thunderbolt 1-3 = en1-en3
IFCONFIG_BRIDGE = "ifconfig__intel_mac_4tb_ports_bridge0__citizen_scientist.txt"   # bridge0 members en1-en4
IFCONFIG_NO_BRIDGE = "ifconfig_a__mbp16_apple_silicon_sonoma14_4__glpi673_partial.txt"
M3ULTRA_IBV = "ibv_devices__m3ultra__mlx_docs_distributed_rst.txt"


def text(name: str) -> str:
    return (FIX / name).read_text()


def ok(out: str) -> dict:
    return {"rc": 0, "out": out, "err": ""}


# The version pair is NOT a recording (none exists, see SOURCES.md): it is what plistlib returns.
VERSION = {"version": "26.2", "build": "25C56"}


def raw_mac(*, ibv=M3ULTRA_IBV, sp=STUDIO_SP, ifconfig=IFCONFIG_NO_BRIDGE, version=VERSION,
            rdma="rdma_ctl_status__macmini_m4pro_macos26_2_enabled__mlx2944.txt") -> dict:
    return {"version": version, "rdma_ctl": ok(text(rdma)), "ibv_devices": ok(text(ibv)), "sp_thunderbolt": ok(text(sp)),
            "networksetup": ok(text(NETWORKSETUP)), "ifconfig": ok(text(ifconfig))}


# ----------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("name, devices", [
    ("ibv_devices__m3ultra__mlx_docs_distributed_rst.txt", ["rdma_en2", "rdma_en3", "rdma_en5", "rdma_en4", "rdma_en6", "rdma_en7"]),
    ("ibv_devices__m3ultra_studio_macos27_2__rdmalink.txt", [f"rdma_en{i}" for i in range(2, 8)]),
    ("ibv_devices__m4pro_macmini__apple_tn3205_ws_collapsed.txt", ["rdma_en2", "rdma_en3", "rdma_en4"]),
    ("ibv_devices__macmini_m4pro_macos26_2_guid_redacted__mlx2944.txt", ["rdma_en2", "rdma_en3", "rdma_en4"]),
    ("ibv_devices__tb4_rdma_enabled_no_devices__omlx3037.txt", []),
])
def test_ibv_devices_every_recording(name, devices):
    assert parse_ibv_devices(text(name)) == devices


@pytest.mark.parametrize("other", ["ibv_devinfo__m4pro_macmini_4node__apple_tn3205_elided.txt",
                                   "rdma_ctl_status__tb4_mac_enabled__omlx3037.txt", IFCONFIG_NO_BRIDGE])
def test_ibv_devices_parser_refuses_other_output(other):
    with pytest.raises(Unreadable, match="could not read ibv_devices output"):
        parse_ibv_devices(text(other))
    with pytest.raises(Unreadable, match="could not read ibv_devices output"):
        parse_ibv_devices("")


@pytest.mark.parametrize("name", ["rdma_ctl_status__macmini_m4pro_macos26_2_enabled__mlx2944.txt",
                                  "rdma_ctl_status__tb4_mac_enabled__omlx3037.txt"])
def test_rdma_ctl_enabled_recordings(name):
    assert parse_rdma_ctl_status(text(name)) is True


def test_rdma_ctl_anything_else_is_unreadable_not_guessed():
    for out in (text(M3ULTRA_IBV), "", "disabled"):  # no recording of the "off" answer exists: never interpreted
        with pytest.raises(Unreadable, match="could not read rdma_ctl status output"):
            parse_rdma_ctl_status(out)


def test_link_speed_recorded_shape_only():
    assert link_gbps("80 Gb/s") == 80
    with pytest.raises(Unreadable, match="could not read the Thunderbolt link speed"):
        link_gbps("Up to 120 Gb/s")  # the recorded value of an empty port


def test_macos_version_strict():
    assert parse_macos_version(VERSION) == ((26, 2), "26.2", "25C56")
    for bad in ({"version": "twenty-six", "build": "25C56"}, {"version": "26.2", "build": ""},
                {"error": "FileNotFoundError: x"}, None):
        with pytest.raises(Unreadable, match="could not read the macOS version"):
            parse_macos_version(bad)


# ----------------------------------------------------------------------------- one host's verdicts


def checks(raw: dict, devices: list[str], system: str = "Darwin") -> HostResult:
    h = HostResult(0, "studio", False)
    jaccl_host_checks(h, {"system": system, "macos": raw}, devices)
    return h


def test_read_macos_from_recordings():
    f = read_macos(raw_mac(ifconfig=IFCONFIG_BRIDGE))
    assert f.errors == {}
    assert f.rdma_enabled and f.ibv_devices[0] == "rdma_en2" and f.bridge == "bridge0"
    assert f.bridge_members == ["en1", "en2", "en3", "en4"]
    cabled = [l for l in f.links if l.peer]
    assert [(l.iface, l.receptacle, l.gbps, l.peer) for l in cabled] == [("en2", "2", 80, "MacBook Pro (Mac17,7)")]
    assert cabled[0].as_json()["generation"] == "Thunderbolt 5"


def test_studio_rdma_en2_passes_every_jaccl_check():
    h = checks(raw_mac(), ["rdma_en2"])
    assert {n: c.status for n, c in h.checks.items()} == {"macos": "pass", "rdma": "pass", "thunderbolt": "pass",
                                                          "bridge": "pass"}
    assert "rdma_en2 80 Gb/s to MacBook Pro (Mac17,7)" in h.checks["thunderbolt"].detail
    assert h.checks["macos"].detail == "macOS 26.2 (25C56)"


def test_bridge_holding_the_port_fails_with_the_fix():
    h = checks(raw_mac(ifconfig=IFCONFIG_BRIDGE), ["rdma_en2"])
    c = h.checks["bridge"]
    assert c.status == "fail" and "bridge0" in c.detail and "holds en2" in c.detail and "deletem" in c.detail


def test_missing_device_and_uncabled_port_are_named():
    # en3 is a port with nothing cabled (Studio receptacle 3); rdma_en1 is not in the M3 Ultra's ibv_devices.
    h = checks(raw_mac(), ["rdma_en1", "rdma_en3"])
    assert h.checks["rdma"].status == "fail" and "does not list rdma_en1" in h.checks["rdma"].detail
    assert "rdma_en3" not in h.checks["rdma"].detail.split("(it lists")[0]
    t = h.checks["thunderbolt"].detail
    assert "rdma_en3: nothing is cabled to Thunderbolt 3 (en3)" in t and "rdma_en1: nothing is cabled to Thunderbolt 1" in t


def test_tb4_mac_with_rdma_enabled_but_no_devices():
    h = checks(raw_mac(ibv="ibv_devices__tb4_rdma_enabled_no_devices__omlx3037.txt",
                       rdma="rdma_ctl_status__tb4_mac_enabled__omlx3037.txt"), ["rdma_en2"])
    assert h.checks["rdma"].status == "fail"
    assert "(it lists: none)" in h.checks["rdma"].detail and "Thunderbolt 5" in h.checks["rdma"].detail


def test_unreadable_and_missing_commands_say_so():
    raw = raw_mac()
    raw["rdma_ctl"] = ok("disabled\n")
    raw["ibv_devices"] = {"rc": None, "out": "", "err": "ibv_devices: not found"}
    h = checks(raw, ["rdma_en2"])
    d = h.checks["rdma"].detail
    assert "could not read rdma_ctl status output: 'disabled'" in d and "rdma_ctl enable" in d
    assert "ibv_devices: not found" in d
    raw = raw_mac(version={"version": "26.1", "build": "25B78"})
    assert "needs macOS 26.2 or later" in checks(raw, ["rdma_en2"]).checks["macos"].detail


def test_linux_host_fails_macos_and_skips_the_rest():
    h = checks({}, ["rdma_en2"], system="Linux")
    assert h.checks["macos"].status == "fail" and "Linux" in h.checks["macos"].detail
    assert {h.checks[n].status for n in ("rdma", "thunderbolt", "bridge")} == {"skip"}


def test_build_agreement_fails_the_minority():
    hosts = [HostResult(i, f"mac{i}", False) for i in range(3)]
    build_agreement(hosts, {0: "25C56", 1: "25C56", 2: "25C60"})
    assert [("macos" in h.checks) for h in hosts] == [False, False, True]
    assert "25C56 on mac0, mac1" in hosts[2].checks["macos"].detail
    same = [HostResult(0, "a", False)]
    build_agreement(same, {0: "25C56"})
    assert same[0].checks == {}


def test_device_names_from_rdma_rows():
    assert device_names([None, "rdma_en3", ["rdma_en4", "rdma_en3"], None]) == ["rdma_en3", "rdma_en4"]


# ----------------------------------------------------------------------------- the probe program itself


def test_probe_argv_ships_the_module_source():
    argv = probes.probe_argv("python3", "host", {})
    assert argv[:2] == ["python3", "-c"] and argv[2] == Path(probe_host.__file__).read_text()


def test_probe_macos_branch_forced_on_linux(monkeypatch, tmp_path):
    """The real probe code collects the macOS facts (commands replaced by `cat` of the recordings), reads a real
    plist, and the controller's parsers read what it sent."""
    plist = tmp_path / "SystemVersion.plist"
    plist.write_bytes(plistlib.dumps({"ProductName": "macOS", "ProductVersion": "26.2", "ProductBuildVersion": "25C56"}))
    monkeypatch.setattr(probe_host, "DARWIN", True)
    monkeypatch.setattr(probe_host, "SYSTEM_VERSION_PLIST", str(plist))
    monkeypatch.setattr(probe_host.macos_version, "__defaults__", (str(plist),))
    files = {"ibv_devices": M3ULTRA_IBV, "rdma_ctl": "rdma_ctl_status__tb4_mac_enabled__omlx3037.txt",
             "sp_thunderbolt": STUDIO_SP, "networksetup": NETWORKSETUP, "ifconfig": IFCONFIG_BRIDGE}
    monkeypatch.setattr(probe_host, "MACOS_COMMANDS", {k: (["cat", str(FIX / v)], 5.0) for k, v in files.items()})
    import time

    raw = probe_host.macos_facts(time.monotonic() + 20)
    f = read_macos(raw)
    assert f.errors == {} and f.version == (26, 2) and f.build == "25C56" and f.bridge_members == ["en1", "en2", "en3", "en4"]
    assert "rdma_en7" in f.ibv_devices


def test_probe_runs_as_a_program_and_reports():
    p = subprocess.run(probes.probe_argv(sys.executable, "host", {"deadline": 5, "macos": True}), input="",
                       capture_output=True, text=True, timeout=120)
    rep = probes.parse_report(p.stdout)
    assert p.returncode == 0 and rep["python"] == sys.executable and rep["mlx"]["version"]
    assert "macos" not in rep  # Linux: the macOS branch stays off


# ----------------------------------------------------------------------------- orch check on the new backends, for real


def test_orch_check_jaccl_hostfile_on_linux_fails_the_macos_row(tmp_path):
    import json

    hf = tmp_path / "h.json"  # no backend named: the full rdma mesh makes it jaccl, as orch run would choose
    hf.write_text(json.dumps({"hosts": [{"ssh": "localhost", "ips": ["127.0.0.1"], "rdma": [None, "rdma_en3"]},
                                        {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": ["rdma_en3", None]}]}))
    p = orch_check("--hostfile", str(hf), "--json")
    assert p.returncode == 1, p.stderr
    res = json.loads(p.stdout)
    assert res["backend"] == "jaccl"
    for h in res["hosts"]:
        c = {x["name"]: x for x in h["checks"]}
        assert c["mlx"]["ok"] and not c["macos"]["ok"] and "this host runs Linux" in c["macos"]["detail"]
        assert c["rdma"]["status"] == "skip"
    hf.write_text(json.dumps({"backend": "jaccl", "hosts": [{"ssh": "localhost", "rdma": [None, None]},
                                                            {"ssh": "127.0.0.1", "rdma": ["rdma_en3", None]}]}))
    p = orch_check("--hostfile", str(hf))
    assert p.returncode == 2 and "no RDMA device is listed for localhost to 127.0.0.1" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_orch_check_accepts_nccl():
    p = orch_check("-n", "2", "--backend", "nccl")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "nccl backend" in p.stdout and "ring links" not in p.stdout
