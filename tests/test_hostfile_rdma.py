"""`orch hostfile --over thunderbolt` writes the rdma matrix (and backend jaccl / jaccl-ring) from the same
system_profiler + networksetup data, when every host's `ibv_devices` lists the devices of its cabled ports.

Inputs are real recordings (tests/fixtures/macos/SOURCES.md). No recording shows `networksetup` and
`ibv_devices` of the same Mac, so which device belongs to which port follows MLX's own rule
(`rdma_` + the port's enX, mlx/_distributed_utils/config.py) and is only ever checked against the host's
`ibv_devices`, never assumed. The 3- and 4-Mac layouts are the SYNTHETIC ones of tests/test_thunderbolt.py
(see tests/fixtures/macos/SYNTHETIC.md), cabled on receptacles 2 and 3 (en2, en3), which the recorded
M4 Pro Mac mini `ibv_devices` (rdma_en2..en4) lists unchanged.

The matrix is compared with what `mlx.distributed_config` itself writes for the same outputs: its real
`prepare_tb_hostfile`, with only its `ssh` calls answered from the same files.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from orchestrator.backends import choose
from orchestrator.hostfile import load_hostfile
from orchestrator.plan import plan_job
from tests.fake_sshd import FakeSSHD
from tests.orch_helpers import run_orch
from tests.test_thunderbolt import synthetic_hosts

FIX = Path(__file__).parent / "fixtures" / "macos"
MBP = FIX / "sp_thunderbolt_json__m5max_mbp__tb5_peer_m3ultra_studio__omlxplus.json"
STUDIO = FIX / "sp_thunderbolt_json__m3ultra_studio__tb5_peer_m5max_mbp_plus_owc_drive__omlxplus.json"
NS = FIX / "networksetup_listallhardwareports__mbp14_2021__alfred20_partial.txt"
IBV_MINI = FIX / "ibv_devices__m4pro_macmini__apple_tn3205_ws_collapsed.txt"  # rdma_en2, en3, en4
IBV_MINI_TABS = FIX / "ibv_devices__macmini_m4pro_macos26_2_guid_redacted__mlx2944.txt"  # same names, tabs
IBV_STUDIO = FIX / "ibv_devices__m3ultra_studio_macos27_2__rdmalink.txt"  # rdma_en2 .. en7
IBV_TB4 = FIX / "ibv_devices__tb4_rdma_enabled_no_devices__omlx3037.txt"  # header only

# SYNTHETIC cabling on receptacles 2 and 3 only (en2/en3 in the networksetup recording).
MESH3 = [((0, "2"), (1, "2")), ((1, "3"), (2, "2")), ((2, "3"), (0, "3"))]
RING4 = [((0, "2"), (1, "3")), ((1, "2"), (2, "3")), ((2, "2"), (3, "3")), ((3, "2"), (0, "3"))]
MGMT = {"mac0": "10.0.0.10", "mac1": "10.0.0.11", "mac2": "10.0.0.12", "mac3": "10.0.0.13"}


def save(directory: Path, outputs: dict[str, tuple[str, str]], ibv: dict[str, Path]) -> Path:
    directory.mkdir()
    for host, (sp, ns) in outputs.items():
        (directory / f"{host}.sp_thunderbolt.json").write_text(sp)
        (directory / f"{host}.networksetup.txt").write_text(ns)
        if host in ibv:
            (directory / f"{host}.ibv_devices.txt").write_text(ibv[host].read_text())
    return directory


def orch_hostfile(tmp_path: Path, hosts: list[str], saved: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "hosts.json"
    r = run_orch("hostfile", "--hosts", ",".join(hosts), "--over", "thunderbolt", "--from-dir", str(saved),
                 "-o", str(out), *extra, cwd=tmp_path)
    return r, out


def by_pair(data: dict) -> dict[tuple[str, str], object]:
    names = [h["ssh"] for h in data["hosts"]]
    return {(names[i], names[j]): dev for i, h in enumerate(data["hosts"]) for j, dev in enumerate(h["rdma"]) if i != j}


def mlx_distributed_config(outputs: dict[str, tuple[str, str]], ibv: dict[str, Path], out: Path, monkeypatch) -> dict:
    """mlx.distributed_config's own planning (prepare_tb_hostfile, auto backend) on the same outputs.

    Only its subprocess calls are answered here (ssh HOST system_profiler / networksetup / ibv_devices /
    ipconfig getifaddr en0), from the same files; its interactive setup prompt gets Enter.
    """
    from mlx._distributed_utils import config
    from mlx._distributed_utils.common import Host

    class Done:
        def __init__(self, stdout):
            self.stdout, self.returncode = stdout, 0

    def fake_run(cmd, capture_output=False, text=False, **kw):
        host, what = cmd[1], cmd[2]
        if what == "system_profiler":
            value = outputs[host][0]
        elif what == "networksetup":
            value = outputs[host][1]
        elif what == "ibv_devices":
            value = ibv[host].read_text() if host in ibv else ""
        elif what == "ipconfig":
            value = MGMT.get(host, "") + "\n"
        else:
            raise AssertionError(cmd)
        return Done(value if text else value.encode())

    monkeypatch.setattr(config, "run", fake_run)
    monkeypatch.setattr("builtins.input", lambda *a: "")
    hosts = [Host(i, h, [], []) for i, h in enumerate(outputs)]
    args = type("Args", (), dict(verbose=False, dot=False, backend=None, auto_setup=False, env=[],
                                 output_hostfile=str(out)))()
    config.prepare_tb_hostfile(args, hosts, [config.SSHInfo(True, False) for _ in hosts])
    return json.loads(out.read_text())


def test_three_macs_cabled_in_a_mesh_get_jaccl_and_the_same_matrix_as_mlx_distributed_config(tmp_path, monkeypatch):
    outputs = synthetic_hosts(3, MESH3)
    ibv = {"mac0": IBV_MINI, "mac1": IBV_MINI_TABS, "mac2": IBV_MINI}
    saved = save(tmp_path / "saved", outputs, ibv)
    r, out = orch_hostfile(tmp_path, list(outputs), saved, "--ips", ",".join(MGMT[h] for h in outputs))
    assert r.returncode == 0, r.stderr
    assert "orch: backend jaccl: every pair of the 3 hosts is cabled" in r.stderr
    ours = json.loads(out.read_text())
    theirs = mlx_distributed_config(outputs, ibv, tmp_path / "mlx.json", monkeypatch)
    assert ours["backend"] == theirs["backend"] == "jaccl"
    assert by_pair(ours) == by_pair(theirs)  # e.g. mac0 -> mac1 over rdma_en2: the device of the port cabled there
    assert {h["ssh"]: h["ips"] for h in ours["hosts"]} == {h["ssh"]: h["ips"] for h in theirs["hosts"]}
    # Both orch and mlx.launch load it; orch plans jaccl from it with rank 0's address as the coordinator.
    hf = load_hostfile(out)
    assert choose(hf).name == "jaccl"
    plan = plan_job(hf, starting_port=44100)
    assert plan.backend == "jaccl" and plan.coordinator.startswith(f"{MGMT[ours['hosts'][0]['ssh']]}:")
    assert all(len(h.links) == 2 for h in hf.hosts)  # the Thunderbolt /30s are still there, per cable
    from mlx._distributed_utils.common import Hostfile

    assert [h.rdma for h in Hostfile.from_file(str(out)).hosts] == [h["rdma"] for h in ours["hosts"]]


def test_four_macs_in_a_ring_get_jaccl_ring_like_mlx_distributed_config(tmp_path, monkeypatch):
    outputs = synthetic_hosts(4, RING4)
    ibv = {h: IBV_MINI for h in outputs}
    saved = save(tmp_path / "saved", outputs, ibv)
    r, out = orch_hostfile(tmp_path, list(outputs), saved, "--ips", ",".join(MGMT[h] for h in outputs))
    assert r.returncode == 0, r.stderr
    assert "orch: backend jaccl-ring: the cables form a ring but not a full mesh" in r.stderr
    ours = json.loads(out.read_text())
    theirs = mlx_distributed_config(outputs, ibv, tmp_path / "mlx.json", monkeypatch)
    assert ours["backend"] == theirs["backend"] == "jaccl-ring"
    assert by_pair(ours) == by_pair(theirs)
    assert plan_job(load_hostfile(out), starting_port=44200).backend == "jaccl-ring"


def test_a_host_without_rdma_devices_keeps_the_ring_hostfile_and_says_why(tmp_path):
    outputs = synthetic_hosts(3, MESH3)
    saved = save(tmp_path / "saved", outputs, {"mac0": IBV_MINI, "mac1": IBV_TB4})  # mac2: no ibv_devices saved
    r, out = orch_hostfile(tmp_path, list(outputs), saved)
    assert r.returncode == 0, r.stderr
    assert ("orch: backend ring: no RDMA over Thunderbolt on every host (mac1: ibv_devices lists no device; "
            "mac2: no ibv_devices output)") in r.stderr
    data = json.loads(out.read_text())
    assert data["backend"] == "ring" and all("rdma" not in h for h in data["hosts"])
    assert plan_job(load_hostfile(out), starting_port=44300).backend == "ring"


def test_the_real_pair_names_a_device_its_recorded_ibv_devices_lacks_and_writes_nothing(tmp_path):
    """Recordings of different Macs do not line up: the MBP's cabled port is Thunderbolt 1 = en1 in the
    networksetup recording, and no recorded ibv_devices lists rdma_en1. Strict: one line, exit 2, no file."""
    outputs = {"mbp": (MBP.read_text(), NS.read_text()), "studio": (STUDIO.read_text(), NS.read_text())}
    saved = save(tmp_path / "saved", outputs, {"mbp": IBV_MINI, "studio": IBV_STUDIO})
    r, out = orch_hostfile(tmp_path, ["mbp", "studio"], saved)
    assert r.returncode == 2
    assert r.stderr.startswith("orch: error: mbp: ibv_devices does not list rdma_en1, the RDMA device MLX names after "
                               "en1 (the port cabled to studio); it lists rdma_en2, rdma_en3, rdma_en4")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and not out.exists()


def test_unreadable_ibv_devices_output_is_one_line_naming_the_host(tmp_path):
    outputs = synthetic_hosts(3, MESH3)
    saved = save(tmp_path / "saved", outputs, {"mac0": IBV_MINI, "mac1": IBV_MINI, "mac2": IBV_MINI})
    (saved / "mac2.ibv_devices.txt").write_text("zsh: command not found: ibv_devices\n")
    r, _ = orch_hostfile(tmp_path, list(outputs), saved, "--ips", ",".join(MGMT[h] for h in outputs))
    assert r.returncode == 2 and r.stderr.startswith("orch: error: mac2: could not read ibv_devices output")
    assert r.stderr.count("\n") == 1


def test_three_jaccl_hosts_without_an_address_every_host_reaches_is_an_error_asking_for_ips(tmp_path):
    outputs = synthetic_hosts(3, MESH3)
    saved = save(tmp_path / "saved", outputs, {h: IBV_MINI for h in outputs})
    r, out = orch_hostfile(tmp_path, list(outputs), saved)
    assert r.returncode == 2 and "--ips a,b,c" in r.stderr and r.stderr.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("ips, words", [("10.0.0.1", "--ips gives 1 addresses for 3 hosts"),
                                        ("10.0.0.1,10.0.0.2,nope", "mac2: 'nope' is not an IPv4 address")])
def test_bad_ips_are_one_line(tmp_path, ips, words):
    outputs = synthetic_hosts(3, MESH3)
    saved = save(tmp_path / "saved", outputs, {h: IBV_MINI for h in outputs})
    r, _ = orch_hostfile(tmp_path, list(outputs), saved, "--ips", ips)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- over SSH


def _answering_sshd(tmp_path: Path, outputs: dict[str, tuple[str, str]], ibv: dict[str, Path]) -> FakeSSHD:
    """A server that answers the three read-only commands per user (= host name) from saved outputs,
    the way each Mac would; ``ibv_devices`` exits 127 where a host has none."""

    def answer(user: str, command: str) -> tuple[str, int]:
        sp, ns = outputs[user]
        if command.startswith("system_profiler SPThunderboltDataType"):
            return sp, 0
        if command == "networksetup -listallhardwareports":
            return ns, 0
        if command == "ibv_devices":
            return (ibv[user].read_text(), 0) if user in ibv else ("", 127)
        return "", 1

    return FakeSSHD(tmp_path, answer)


def _client_files(sshd: FakeSSHD, tmp_path: Path, hosts) -> list[str]:
    cfg = sshd.ssh_config(tmp_path / "ssh_config", hosts)
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line())
    return ["--ssh-config", str(cfg), "--known-hosts", str(kh), "-i", str(sshd.key_path), "--connect-timeout", "10"]


@pytest.mark.parametrize("with_rdma", [True, False], ids=["every-host-has-rdma", "one-host-without-ibv_devices"])
def test_over_ssh_ibv_devices_is_read_from_every_host(tmp_path, with_rdma):
    outputs = synthetic_hosts(3, MESH3)
    ibv = {"mac0": IBV_MINI, "mac1": IBV_MINI_TABS, "mac2": IBV_MINI} if with_rdma else {"mac0": IBV_MINI, "mac1": IBV_MINI}
    out = tmp_path / "hosts.json"
    with _answering_sshd(tmp_path, outputs, ibv) as sshd:
        r = run_orch("hostfile", "--hosts", "mac0,mac1,mac2", "--over", "thunderbolt", "-o", str(out),
                     *_client_files(sshd, tmp_path, outputs), cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert {(u, c) for u, c in sshd.commands if c == "ibv_devices"} == {(h, "ibv_devices") for h in outputs}
    data = json.loads(out.read_text())
    if with_rdma:
        assert data["backend"] == "jaccl" and all(h["rdma"] for h in data["hosts"])
        # The coordinator candidate is the address the SSH connection reached (here every "Mac" is 127.0.0.1).
        assert [h["ips"] for h in data["hosts"]] == [["127.0.0.1"]] * 3
    else:
        assert data["backend"] == "ring" and "mac2: no ibv_devices output" in r.stderr
