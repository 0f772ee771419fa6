"""`orch hostfile`: generated hostfiles load in orch and in mlx.launch; rings and broken rings; --apply never
runs text from a host unchecked, asks first, and connects the way `orch run` does."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from orchestrator.health.hostfile_gen import thunderbolt_hostfile
from orchestrator.hostfile import ConfigError, load_hostfile
from orchestrator.plan import plan_job
from tests.fake_sshd import FakeSSHD
from tests.orch_helpers import finish, orch_argv, run_orch
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


# ----------------------------------------------------------------------------- --apply: hostile input, consent, SSH options

TB_PAIR = ["hostfile", "--hosts", "mbp,studio", "--over", "thunderbolt"]


def _real_pair(ns_mbp: str | None = None) -> dict[str, tuple[str, str]]:
    return {"mbp": (MBP.read_text(), ns_mbp if ns_mbp is not None else NS.read_text()),
            "studio": (STUDIO.read_text(), NS.read_text())}


def _start(args, cwd, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(orch_argv(*args), cwd=cwd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_the_real_commands_are_built_from_checked_parts():
    _, commands = thunderbolt_hostfile(_real_pair(), "192.168.0.0")
    assert commands["mbp"] == [["sudo", "ifconfig", "bridge0", "down"],
                               ["sudo", "ifconfig", "en1", "inet", "192.168.0.1", "netmask", "255.255.255.252"],
                               ["sudo", "route", "change", "192.168.0.2", "-interface", "en1"]]


@pytest.mark.parametrize("port,evil", [
    ("Thunderbolt 1", "en1; rm -rf /"),          # the port in the ring
    ("Thunderbolt Bridge", "bridge0 $(reboot)"),  # the bridge every host takes down
    ("Thunderbolt 1", "EN1"),
    ("Thunderbolt 1", "en1234567890123456"),
])
def test_a_hostile_interface_name_is_refused(tmp_path, port, evil):
    text = NS.read_text()
    block = f"Hardware Port: {port}\nDevice: "
    assert block in text  # the real recording has this port
    start = text.index(block) + len(block)
    hostile = text[:start] + evil + text[text.index("\n", start):]
    with pytest.raises(ConfigError, match="not an interface name"):
        thunderbolt_hostfile(_real_pair(hostile), "192.168.0.0")
    d = tmp_path / "saved"
    save(d, _real_pair(hostile))
    out = tmp_path / "hosts.json"
    r = finish(_start([*TB_PAIR, "--from-dir", str(d), "-o", str(out), "--apply", "--yes"], tmp_path), 60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "mbp: networksetup names" in r.stderr and repr(evil) in r.stderr
    assert not out.exists() and "sudo" not in r.stderr


def test_a_bad_base_address_is_one_line(tmp_path):
    d = tmp_path / "saved"
    save(d, _real_pair())
    r = finish(_start([*TB_PAIR, "--from-dir", str(d), "--base", "192.168.0.0; id"], tmp_path), 60)
    assert r.returncode == 2 and r.stderr.startswith("orch: error: --base") and "Traceback" not in r.stderr


def test_apply_without_a_terminal_or_yes_refuses(tmp_path):
    d = tmp_path / "saved"
    save(d, _real_pair())
    r = finish(_start([*TB_PAIR, "--from-dir", str(d), "--apply"], tmp_path), 60)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == ("orch: error: --apply runs the commands above as root: confirm at a terminal, "
                                         "or add --yes")


def test_apply_asks_at_the_terminal_and_no_means_nothing_runs(tmp_path):
    d = tmp_path / "saved"
    save(d, _real_pair())
    master, slave = os.openpty()
    try:
        p = _start([*TB_PAIR, "--from-dir", str(d), "--apply", "--connect-timeout", "1"], tmp_path, stdin=slave)
        os.write(master, b"n\n")
        r = finish(p, 60)
    finally:
        os.close(master)
        os.close(slave)
    assert r.returncode == 1
    assert "run these commands with sudo on 2 hosts? [y/N]" in r.stderr and "nothing was run" in r.stderr
    assert "cannot reach" not in r.stderr  # no connection was even tried


def test_apply_honours_known_hosts_and_sends_quoted_sudo_n_commands(tmp_path):
    d = tmp_path / "saved"
    save(d, _real_pair())
    with FakeSSHD(tmp_path) as sshd:
        cfg = sshd.ssh_config(tmp_path / "ssh_config", ["mbp", "studio"], user="orch")
        empty = tmp_path / "known_hosts_empty"
        empty.write_text("")
        args = [*TB_PAIR, "--from-dir", str(d), "--apply", "--yes", "--ssh-config", str(cfg), "-i", str(sshd.key_path),
                "--connect-timeout", "5"]
        refused = finish(_start([*args, "--known-hosts", str(empty)], tmp_path), 60)
        assert refused.returncode == 2 and "cannot reach mbp:" in refused.stderr and "studio:" in refused.stderr
        assert sshd.commands == []  # an unknown host key: nothing was sent
        kh = tmp_path / "known_hosts"
        kh.write_text(sshd.known_hosts_line())
        r = finish(_start([*args, "--known-hosts", str(kh)], tmp_path), 60)
        assert r.returncode == 0, r.stderr
        assert "addresses applied on every host" in r.stderr
    expected = {shlex.join(["sudo", "-n", *c[1:]]) for cmds in thunderbolt_hostfile(_real_pair(), "192.168.0.0")[1].values()
                for c in cmds}
    sent = [c for _, c in sshd.commands]
    assert set(sent) == expected and len(sent) == 6
