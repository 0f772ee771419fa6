"""``orch stage``: a folder onto every host, relayed host to host, on namespace hosts that each have their own disk.

Real parts only: the real ``orch`` command, real sshd in network namespaces (``tests/netns_disks.py``:
each host's sessions see their own tmpfs, so a copy on every host is really N copies), real TCP
between the relays. What each test checks is read back from each host's own disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import kill_pids_in_netns
from tests.netns_disks import DiskCluster, make_disk_cluster_fixture
from tests.orch_helpers import finish, kill_tree, run_orch, start_orch

ROOT = Path(__file__).resolve().parent.parent

c4 = make_disk_cluster_fixture(4, scope="module", name="c4", disk_mb=512)


def write_hostfile(c, path: Path) -> Path:
    hosts = [{"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]} for h in c.hosts]
    path.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    return path


def stage_args(c, src: Path, dest: str, hostfile: Path, *extra: str) -> list[str]:
    return ["stage", str(src), "--hostfile", str(hostfile), "--to", dest, "--ssh-config", c.ssh_config_path,
            "--known-hosts", c.known_hosts_path, "--python", sys.executable, "--json", *extra]


def make_model(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, str]:
    """A model-like folder of random files; returns {rel: sha256}."""
    import hashlib
    import random

    rng = random.Random(seed)
    out = {}
    for rel, size in sizes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size)
        p.write_bytes(data)
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def result(p: subprocess.CompletedProcess) -> dict:
    try:
        return json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"no JSON summary (rc {p.returncode}):\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}") from None


def wait_hosts_clean(c, timeout: float = 10.0) -> None:
    """Nothing but the sshd listeners left in the hosts (the relays ended with the stage)."""
    deadline = time.monotonic() + timeout
    while True:
        left = c.running_processes()
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still running on the hosts: {left}")
        time.sleep(0.1)


def part_sizes(c, i: int, dest: str) -> list[int]:
    p = c.disk_exec(i, f'stat -c %s "{dest}"/.orch-stage/*.part 2>/dev/null', check=False)
    return [int(x) for x in p.stdout.split()]


def shape_controller_link(c, i: int, mbit: int) -> str:
    """Slow what the controller sends to host i (the root side of its management veth): a stage lasts seconds."""
    dev = c.root_mgmt_links[i]
    subprocess.run(["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", "64kb",
                    "latency", "400ms"], check=True, timeout=10)
    return dev


def unshape(dev: str) -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=10)




# ----------------------------------------------------------------------------- every host, then nothing again


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_folder_reaches_every_host_and_a_second_run_moves_nothing(c4, tmp_path):
    src = tmp_path / "model"
    want = make_model(src, {"model-00001.safetensors": 6_000_000, "model-00002.safetensors": 3_000_001,
                            "config.json": 321, "tokenizer/tokenizer.json": 70_000, "empty.txt": 0})
    dest = f"{c4.disk}/m1"
    hf = write_hostfile(c4, tmp_path / "hosts.json")
    first = result(run_orch(*stage_args(c4, src, dest, hf), cwd=tmp_path))
    assert first["status"] == "ok", first
    for i in range(4):
        assert c4.sha256s(i, dest) == want, f"host{i}"
    total = sum((src / r).stat().st_size for r in want)
    assert first["sent_by_controller"] == total  # the bytes left the controller once, not once per host
    assert [h["bytes_written"] for h in first["hosts"]] == [total] * 4
    assert all(h["bytes_received"] == total for h in first["hosts"])
    hosts = c4.hosts  # along the ring, each hop over the /30 the two hosts share
    assert first["route"] == [f"this machine -> host0 at {hosts[0].mgmt_ip}"] + [
        f"host{i} -> host{i + 1} at {hosts[i + 1].left_ip} (ring)" for i in range(3)]
    wait_hosts_clean(c4)

    second = result(run_orch(*stage_args(c4, src, dest, hf), cwd=tmp_path))
    assert second["status"] == "ok", second
    assert second["sent_by_controller"] == 0 and second["passes"] == 0
    assert all(h["bytes_received"] == 0 and h["files_skipped"] == len(want) for h in second["hosts"])
    assert [h["checked"] for h in second["hosts"]] == ["sftp"] * 4  # nothing changed: no relay had to start
    verified = result(run_orch(*stage_args(c4, src, dest, hf, "--verify"), cwd=tmp_path))
    assert [h["checked"] for h in verified["hosts"]] == ["verify"] * 4 and verified["sent_by_controller"] == 0
    wait_hosts_clean(c4)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_corrupted_file_on_one_host_is_found_and_replaced(c4, tmp_path):
    src = tmp_path / "model"
    want = make_model(src, {"weights.safetensors": 2_000_000, "config.json": 99}, seed=1)
    dest = f"{c4.disk}/m2"
    hf = write_hostfile(c4, tmp_path / "hosts.json")
    assert result(run_orch(*stage_args(c4, src, dest, hf), cwd=tmp_path))["status"] == "ok"
    # one flipped region on host2; the size stays the same
    c4.disk_exec(2, f'printf XXXXXXXX | dd of="{dest}/weights.safetensors" bs=1 seek=1000 conv=notrunc status=none')
    assert c4.sha256s(2, dest)["weights.safetensors"] != want["weights.safetensors"]

    again = result(run_orch(*stage_args(c4, src, dest, hf), cwd=tmp_path))
    assert again["status"] == "ok", again
    by = {h["host"]: h for h in again["hosts"]}
    assert by["host2"]["checked"] == "relay" and by["host0"]["checked"] == "sftp"
    assert by["host2"]["files_replaced"] == ["weights.safetensors"]
    assert by["host2"]["bytes_written"] == 2_000_000
    assert all(by[f"host{i}"]["bytes_written"] == 0 for i in (0, 1, 3))
    assert again["sent_by_controller"] == 2_000_000  # only the damaged file travelled
    for i in range(4):
        assert c4.sha256s(i, dest) == want, f"host{i}"
    wait_hosts_clean(c4)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_stage_killed_halfway_moves_only_the_rest(c4, tmp_path):
    size = 40_000_000
    src = tmp_path / "model"
    want = make_model(src, {"big.safetensors": size}, seed=2)
    dest = f"{c4.disk}/m3"
    hf = write_hostfile(c4, tmp_path / "hosts.json")
    dev = shape_controller_link(c4, 0, 80)  # ~10 MB/s into the chain: the stage takes seconds
    try:
        p = start_orch(*stage_args(c4, src, dest, hf), cwd=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while True:  # until the last host has a quarter of the file
                got = part_sizes(c4, 3, dest)
                if got and got[0] >= size // 4:
                    break
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, "the stage made no progress"
                time.sleep(0.1)
        finally:
            kill_tree(p.pid)
            p.communicate(timeout=10)
        wait_hosts_clean(c4)
        parts = [part_sizes(c4, i, dest) for i in range(4)]
        assert all(len(x) == 1 and 0 < x[0] < size for x in parts), parts
        assert all("big.safetensors" not in c4.sha256s(i, dest) for i in range(4))  # nothing half-written is visible
    finally:
        unshape(dev)

    again = result(run_orch(*stage_args(c4, src, dest, hf), cwd=tmp_path))
    assert again["status"] == "ok", again
    least = min(x[0] for x in parts)
    assert again["sent_by_controller"] == size - least  # only the rest left the controller
    for i, h in enumerate(again["hosts"]):
        assert h["resumed_bytes"] == parts[i][0]
        assert h["bytes_written"] == size - parts[i][0]
    for i in range(4):
        assert c4.sha256s(i, dest) == want, f"host{i}"
        assert part_sizes(c4, i, dest) == []
    wait_hosts_clean(c4)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_ring_cable_that_is_down_is_bridged_over_the_lan(c4, tmp_path):
    src = tmp_path / "model"
    want = make_model(src, {"weights.safetensors": 1_000_000}, seed=5)
    dest = f"{c4.disk}/m4"
    hf = write_hostfile(c4, tmp_path / "hosts.json")
    c4.link_down(1)  # the cable between host1 and host2
    try:
        p = run_orch(*stage_args(c4, src, dest, hf), cwd=tmp_path)
    finally:
        c4.link_up(1)
    res = result(p)
    assert res["status"] == "ok", res
    assert f"host1 -> host2 at {c4.hosts[2].mgmt_ip} (lan)" in res["route"]
    assert "host1 -> host2 failed over the ring address" in p.stderr
    for i in range(4):
        assert c4.sha256s(i, dest) == want, f"host{i}"
    wait_hosts_clean(c4)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_host_that_vanishes_is_named_and_the_rest_get_the_files(tmp_path):
    from tests.netns import require_netns

    require_netns()
    size = 40_000_000
    src = tmp_path / "model"
    want = make_model(src, {"big.safetensors": size, "config.json": 10}, seed=3)
    with DiskCluster(4, disk_mb=256) as c:
        dest = f"{c.disk}/m"
        hf = write_hostfile(c, tmp_path / "hosts.json")
        shape_controller_link(c, 0, 80)  # the veth goes away with the cluster
        p = start_orch(*stage_args(c, src, dest, hf), cwd=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while True:
                got = part_sizes(c, 3, dest)
                if got and got[0] >= size // 5:
                    break
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, "the stage made no progress"
                time.sleep(0.1)
            # host2 goes away: every process of it dies (sshd, the relay) and its network goes down
            kill_pids_in_netns([c.namespaces[2]])
            subprocess.run(["ip", "-n", c.namespaces[2], "link", "set", "mgmt0", "down"], check=False, timeout=10)
            out = finish(p, 120)
        except BaseException:
            kill_tree(p.pid)
            raise
        res = result(out)
        assert out.returncode == 1
        by = {h["host"]: h for h in res["hosts"]}
        assert by["host2"]["status"] == "gone" and "host2" in by["host2"]["reason"], by["host2"]
        assert res["status"] == "partial"
        for i in (0, 1, 3):
            assert by[f"host{i}"]["status"] == "ok"
            assert c.sha256s(i, dest) == want, f"host{i}"
        assert res["sent_by_controller"] < 2 * size  # the others continued where they were
        assert "host2" in out.stdout
        wait_hosts_clean(c)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, words", [
    (["stage", "/no/such/model", "--hosts", "localhost", "--to", "/tmp/x"], "SRC '/no/such/model'"),
    (["stage", "{src}", "--hosts", "localhost", "--to", "models/x"], "--to 'models/x': give an absolute path"),
    (["stage", "{src}", "--hosts", "localhost", "--to", "/"], "--to '/'"),
    (["stage", "{src}", "--hostfile", "{bad}", "--to", "/tmp/x"], "hosts[0].ips"),
    (["stage", "{src}", "--hostfile", "/no/such/hosts.json", "--to", "/tmp/x"], "hosts.json"),
    (["stage", "{src}", "--hosts", "localhost"], "--to"),
    (["stage", "{src}", "--to", "/tmp/x"], "--hostfile"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, words):
    src = tmp_path / "m"
    src.mkdir()
    (src / "a").write_text("a")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hosts": [{"ssh": "h", "ips": ["10.0.0.300"]}]}))
    argv = [a.format(src=src, bad=bad) for a in args]
    p = run_orch(*argv, cwd=tmp_path, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("orch: error: "), p.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_this_machine_as_the_only_host(tmp_path):
    """A hostfile of this machine: the relay runs as a local process; the second run moves nothing."""
    src = tmp_path / "model"
    want = make_model(src, {"w.safetensors": 3_000_000, "sub/c.json": 12}, seed=4)
    dest = tmp_path / "dest"
    args = ["stage", str(src), "--hosts", "localhost", "--to", str(dest), "--json"]
    first = result(run_orch(*args, cwd=tmp_path))
    assert first["status"] == "ok" and first["sent_by_controller"] == 3_000_012
    import hashlib

    assert {r: hashlib.sha256((dest / r).read_bytes()).hexdigest() for r in want} == want
    assert sorted(os.listdir(dest / ".orch-stage")) == ["verified.json"]
    second = result(run_orch(*args, cwd=tmp_path))
    assert second["sent_by_controller"] == 0 and second["hosts"][0]["files_skipped"] == 2


# ----------------------------------------------------------------------------- the chain's addresses


def test_each_hop_goes_over_the_cable_between_the_two_hosts_else_the_lan():
    from orchestrator.hostfile import Host
    from orchestrator.stage.plan import hop_address

    a = Host(name="mac1", ips=["192.168.0.1/30", "192.168.0.10/30"])
    b = Host(name="mac2", ips=["192.168.0.2/30", "192.168.0.5/30"])
    c = Host(name="mac3", ips=["192.168.0.6/30", "192.168.0.9/30"])
    assert hop_address(a, b, "10.0.0.2") == ("192.168.0.2", "ring")      # the /30 they share
    assert hop_address(b, c, "10.0.0.3") == ("192.168.0.6", "ring")
    assert hop_address(c, a, "10.0.0.1") == ("192.168.0.10", "ring")
    d = Host(name="mac4", ips=["192.168.0.14/30"])
    assert hop_address(a, d, "10.0.0.4") == ("10.0.0.4", "lan")          # no cable: where SSH reached it
    plain = Host(name="mac5", ips=["10.1.0.5"])
    assert hop_address(a, plain, "10.0.0.5") == ("10.1.0.5", "ips")     # no prefixes: MLX's meaning


def test_a_partial_file_with_wrong_bytes_is_caught_at_the_end_and_sent_whole(tmp_path):
    """A temporary file left by an earlier stage is trusted up to its length; if those bytes were wrong the
    file's SHA-256 says so when the rest arrives: it is dropped, never renamed into place, and sent again whole."""
    import hashlib
    import socket

    src = tmp_path / "model"
    want = make_model(src, {"w.safetensors": 2_000_000}, seed=6)
    dest = tmp_path / "dest"
    (dest / ".orch-stage").mkdir(parents=True)
    host = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in socket.gethostname())[:64]
    (dest / ".orch-stage" / f"{want['w.safetensors']}.{host}.part").write_bytes(b"\0" * 500_000)
    res = result(run_orch("stage", str(src), "--hosts", "localhost", "--to", str(dest), "--json", cwd=tmp_path))
    assert res["status"] == "ok", res
    assert res["passes"] == 2
    assert res["hosts"][0]["resumed_bytes"] == 500_000
    assert res["sent_by_controller"] == (2_000_000 - 500_000) + 2_000_000
    assert hashlib.sha256((dest / "w.safetensors").read_bytes()).hexdigest() == want["w.safetensors"]
    assert sorted(os.listdir(dest / ".orch-stage")) == ["verified.json"]


def test_progress_bars_on_a_terminal_and_plain_lines_elsewhere():
    import io

    from orchestrator.stage.progress import Progress

    tty = io.StringIO()
    p = Progress(["mac1", "mac2"], tty, tty=True)
    p.start_pass({"mac1": 1000, "mac2": 1000})
    p.update("mac1", 500)
    p.mark("mac2", "gone")
    text = tty.getvalue()
    assert "\x1b[2F" in text  # redrawn in place
    last = text.rsplit("\x1b[2F", 1)[-1]
    assert "mac1" in last and " 50.0%" in last and "500 B / 1000 B" in last
    assert "mac2" in last and "gone" in last
    plain = io.StringIO()
    q = Progress(["mac1"], plain, tty=False)
    q.start_pass({"mac1": 1000})
    q.update("mac1", 10)
    assert plain.getvalue() == ""  # plain lines every few seconds, not per update
    q.mark("mac1", "gone")
    assert plain.getvalue() == "orch stage: mac1 gone\n"


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_host_that_cannot_be_reached_is_named_and_the_others_get_the_files(c4, tmp_path):
    src = tmp_path / "model"
    want = make_model(src, {"w.safetensors": 500_000}, seed=7)
    dest = f"{c4.disk}/m5"
    hosts = [{"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]} for h in c4.hosts]
    nobody = c4.mgmt_gateway.rsplit(".", 1)[0] + ".99"  # on the management subnet, but no host has it
    hosts.insert(2, {"ssh": nobody})
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"hosts": hosts}))
    p = run_orch(*stage_args(c4, src, dest, hf, "--connect-timeout", "2"), cwd=tmp_path)
    res = result(p)
    assert p.returncode == 1 and res["status"] == "partial"
    by = {h["host"]: h for h in res["hosts"]}
    assert by[nobody]["status"] == "unreachable" and f"cannot reach {nobody}" in by[nobody]["reason"]
    for i in range(4):
        assert by[f"host{i}"]["status"] == "ok"
        assert c4.sha256s(i, dest) == want, f"host{i}"
    assert f"{nobody}" in p.stdout

    missing = run_orch(*stage_args(c4, src, f"{c4.disk}/m6", write_hostfile(c4, tmp_path / "h4.json"),
                                   "--python", "/no/such/python3"), cwd=tmp_path)  # the last --python wins
    res = result(missing)
    assert res["status"] == "failed" and all("/no/such/python3" in h["reason"] for h in res["hosts"]), res
    wait_hosts_clean(c4)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_stops_the_stage_keeps_what_arrived_and_the_next_run_continues(c4, tmp_path):
    import signal

    size = 30_000_000
    src = tmp_path / "model"
    want = make_model(src, {"w.safetensors": size}, seed=8)
    dest = f"{c4.disk}/m7"
    args = stage_args(c4, src, dest, write_hostfile(c4, tmp_path / "hosts.json"))
    dev = shape_controller_link(c4, 0, 40)  # ~5 MB/s into the chain: the interrupt comes mid-file
    try:
        p = start_orch(*args, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while not part_sizes(c4, 3, dest):
                assert p.poll() is None and time.monotonic() < deadline, p.communicate()
                time.sleep(0.05)
            p.send_signal(signal.SIGINT)
            out = finish(p, 60)
        except BaseException:
            kill_tree(p.pid)
            raise
    finally:
        unshape(dev)
    assert out.returncode == 130, (out.stdout, out.stderr)
    assert out.stderr.strip().splitlines()[-1].startswith(f"orch stage: interrupted; what arrived stays in {dest}/")
    wait_hosts_clean(c4)  # the relays ended with it
    kept = [part_sizes(c4, i, dest) for i in range(4)]
    assert all(len(k) == 1 and 0 < k[0] < size for k in kept), kept
    res = result(run_orch(*args, cwd=tmp_path))
    assert res["status"] == "ok" and [h["resumed_bytes"] for h in res["hosts"]] == [k[0] for k in kept]
    assert res["sent_by_controller"] == size - min(k[0] for k in kept)
    for i in range(4):
        assert c4.sha256s(i, dest) == {"w.safetensors": want["w.safetensors"]}
    wait_hosts_clean(c4)


def test_one_stop_per_machine_in_hostfile_order():
    from orchestrator.hostfile import parse_hostfile
    from orchestrator.stage.plan import stops

    hf = parse_hostfile({"hosts": [{"ssh": "mac1", "slots": 2}, {"ssh": "mac2"}, {"ssh": "mac1"},
                                   {"ssh": "mac2", "port": 2222}, {"ssh": "localhost"}, {"ssh": "127.0.0.1"}]})
    assert [(s.index, s.name) for s in stops(hf)] == [(0, "mac1"), (1, "mac2"), (3, "mac2"), (4, "localhost")]


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_orch_run_stage_to_puts_the_files_on_every_host_before_the_ranks_start(c4, tmp_path):
    """``orch run --stage-to SRC:DEST``: the stage is the run's first step; a rank finds the files on its host."""
    src = tmp_path / "model"
    want = make_model(src, {"weights.safetensors": 800_000, "config.json": 42}, seed=11)
    dest = f"{c4.disk}/run-model"
    script = tmp_path / "needs_model.py"
    script.write_text(
        "import hashlib, os, sys\n"
        f"p = os.path.join({dest!r}, 'weights.safetensors')\n"
        "digest = hashlib.sha256(open(p, 'rb').read()).hexdigest()\n"
        "print('weights', digest, flush=True)\n")
    hf = write_hostfile(c4, tmp_path / "hosts.json")
    rd = tmp_path / "run"
    r = run_orch("run", str(script), "--hostfile", str(hf), "--ssh-config", c4.ssh_config_path,
                 "--known-hosts", c4.known_hosts_path, "--python", sys.executable, "--run-dir", str(rd),
                 "--stage-to", f"{src}:{dest}", cwd=tmp_path, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--stage-to: 2 files -> " in r.stderr, r.stderr[-2000:]
    for i in range(4):
        assert c4.sha256s(i, dest) == want, f"host{i}"
        assert f"weights {want['weights.safetensors']}" in (rd / "logs" / f"rank-{i}.log").read_text()
    wait_hosts_clean(c4)

    bad = run_orch("run", str(script), "--hostfile", str(hf), "--stage-to", f"{src}:relative/path", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--stage-to" in bad.stderr, bad.stderr


def test_a_written_file_keeps_its_mtime_a_second_below_its_ctime_whatever_the_wall_clock_says(tmp_path, monkeypatch):
    """The controller's SFTP fast path (unchanged.py) trusts a file only if its mtime lies in an earlier second
    than its ctime. The kernel stamps ctime from a coarse clock that can lag ``time.time()`` across a second
    boundary (CI once saw one host of four fail the check that way); a wall clock a second ahead of the
    kernel's must not matter."""
    import hashlib
    import time as _time

    from orchestrator.stage import relay as relay_mod
    from orchestrator.stage.relay_parts import FileState

    data = os.urandom(10_000)
    sha = hashlib.sha256(data).hexdigest()
    r = relay_mod.Relay({"dest": str(tmp_path / "dest"), "files": [{"rel": "w.bin", "size": len(data), "sha": sha}]})
    os.makedirs(r.state)
    fs = FileState(r, 0, r.files[0])
    fs.seed()
    fs.open()
    os.write(fs.fd, data)
    fs.hash.update(data)
    fs.offset = len(data)
    real = _time.time
    monkeypatch.setattr(relay_mod.time, "time", lambda: real() + 1.0)
    assert r.finish(fs)
    st = os.lstat(tmp_path / "dest" / "w.bin")
    assert st.st_mtime_ns // 10**9 < st.st_ctime_ns // 10**9
    assert r.verified["w.bin"][2] // 10**9 < r.verified["w.bin"][3] // 10**9
