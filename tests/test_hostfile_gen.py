"""`orch hostfile`: generated hostfiles load in orch and in mlx.launch; rings and broken rings."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.hostfile import load_hostfile
from orchestrator.plan import plan_job
from tests.orch_helpers import run_orch
from tests.test_thunderbolt import CHAIN4, RING4, synthetic_hosts

FIX = Path(__file__).parent / "fixtures" / "macos"
MBP = FIX / "sp_thunderbolt_json__m5max_mbp__tb5_peer_m3ultra_studio__omlxplus.json"
STUDIO = FIX / "sp_thunderbolt_json__m3ultra_studio__tb5_peer_m5max_mbp_plus_owc_drive__omlxplus.json"
NS = FIX / "networksetup_listallhardwareports__mbp14_2021__alfred20_partial.txt"


def save(directory: Path, outputs: dict[str, tuple[str, str]]) -> None:
    directory.mkdir()
    for host, (sp, ns) in outputs.items():
        (directory / f"{host}.sp_thunderbolt.json").write_text(sp)
        (directory / f"{host}.networksetup.txt").write_text(ns)


def mlx_launch_accepts(path: Path) -> list:
    from mlx._distributed_utils.common import Hostfile

    return Hostfile.from_file(str(path)).hosts


def test_real_tb5_pair_gives_a_two_host_ring(tmp_path):
    d = tmp_path / "saved"
    save(d, {"mbp": (MBP.read_text(), NS.read_text()), "studio": (STUDIO.read_text(), NS.read_text())})
    out = tmp_path / "hosts.json"
    r = run_orch("hostfile", "--hosts", "mbp,studio", "--over", "thunderbolt", "--from-dir", str(d), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "sudo ifconfig en1 inet 192.168.0.1 netmask 255.255.255.252" in r.stderr
    hf = load_hostfile(out)
    assert [h.name for h in hf.hosts] == ["mbp", "studio"]
    assert [h.ips for h in hf.hosts] == [["192.168.0.1"], ["192.168.0.2"]]
    assert [len(h.links) for h in hf.hosts] == [1, 1]
    assert [h.ssh_hostname for h in mlx_launch_accepts(out)] == ["mbp", "studio"]


def test_synthetic_four_mac_ring_plans_left_neighbour_addresses(tmp_path):
    d = tmp_path / "saved"
    save(d, synthetic_hosts(4, RING4))
    out = tmp_path / "hosts.json"
    r = run_orch("hostfile", "--hosts", "mac0,mac1,mac2,mac3", "--over", "thunderbolt", "--from-dir", str(d),
                 "-o", str(out), "--base", "10.50.0.0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hf = load_hostfile(out)
    plan = plan_job(hf, "ring", starting_port=7000)
    order = [h.name for h in hf.hosts]
    assert order[0] == "mac0" and sorted(order) == ["mac0", "mac1", "mac2", "mac3"]
    for r_ in plan.ranks:  # rank i listens on the cable it shares with rank i-1
        ip = r_.listen[0].rsplit(":", 1)[0]
        left = hf.hosts[(r_.host_index - 1) % 4]
        link = next(link for link in left.links if link.peer == hf.hosts[r_.host_index].name)
        assert ip.rsplit(".", 1)[0] == link.ip.split("/")[0].rsplit(".", 1)[0]
    assert len(mlx_launch_accepts(out)) == 4


def test_broken_chain_names_the_missing_cable(tmp_path):
    d = tmp_path / "saved"
    save(d, synthetic_hosts(4, CHAIN4))
    r = run_orch("hostfile", "--hosts", "mac0,mac1,mac2,mac3", "--over", "thunderbolt", "--from-dir", str(d), cwd=tmp_path)
    assert r.returncode == 2
    assert "missing a cable between mac3 and mac0" in r.stderr and "Traceback" not in r.stderr


def test_ethernet_with_given_ips(tmp_path):
    r = run_orch("hostfile", "--hosts", "a,b,c", "--ips", "10.1.0.1,10.1.0.2,10.1.0.3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [h["ips"] for h in data["hosts"]] == [["10.1.0.1"], ["10.1.0.2"], ["10.1.0.3"]]
    r = run_orch("hostfile", "--hosts", "a,b", "--ips", "10.1.0.1", cwd=tmp_path)
    assert r.returncode == 2 and "--ips gives 1 addresses for 2 hosts" in r.stderr
