"""``orch run --stdin rank0|all|none``: orch's stdin reaches the chosen ranks, the guard's teardown stays.

Real runs of the real ``orch`` command (local ranks, a real mpirun, real sshd in
network namespaces), plus the guard alone fed control lines by hand. What must
hold: the chosen ranks read exactly the bytes orch read (binary, large, in
order) and then end of file; the others read /dev/null; orch's end of file ends
the ranks' input but stops nobody; user bytes can never pass for a control
line; and a SIGKILLed controller still takes every rank with it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import make_cluster_fixture
from tests.orch_helpers import ROOT, SCRIPTS, alive, events, kill_tree, orch_argv, summary, wait_for_line

ECHO = SCRIPTS / "stdin_echo.py"
DIGEST = SCRIPTS / "stdin_digest.py"


def orch_with_input(*args: str, cwd: Path, data: bytes, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run orch with ``data`` on its stdin (then end of file); bounded, and its tree killed on timeout."""
    p = subprocess.Popen(orch_argv(*args), cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"orch did not finish in {timeout}s\nstdout:\n{out.decode()}\nstderr:\n{err.decode()}")
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def rank_lines(text: str, rank: int) -> list[str]:
    return [l[len(f"[{rank}] "):] for l in text.splitlines() if l.startswith(f"[{rank}] ")]


# ----------------------------------------------------------------------------- local runs


@pytest.mark.slow
def test_rank0_reads_orch_stdin_and_rank1_reads_dev_null(tmp_path):
    rd = tmp_path / "run"
    r = orch_with_input("run", str(ECHO), "-n", "2", "--stdin", "rank0", "--run-dir", str(rd),
                        cwd=tmp_path, data=b"hello\nworld\n")
    assert r.returncode == 0, r.stderr
    assert rank_lines(r.stdout, 0) == ["rank 0 got 'hello'", "rank 0 got 'world'", "rank 0 eof after 2 lines"]
    assert rank_lines(r.stdout, 1) == ["rank 1 eof after 0 lines"]
    # End of file on orch's stdin ended rank 0's input only: it ran on and exited 0 (not stopped).
    s = summary(rd)
    assert s["status"] == "succeeded" and [x["exit_code"] for x in s["ranks"]] == [0, 0]
    assert "rank 0 got 'world'" in (rd / "logs" / "rank-0.log").read_text()


@pytest.mark.slow
def test_all_ranks_read_the_same_input(tmp_path):
    r = orch_with_input("run", str(ECHO), "-n", "2", "--stdin", "all", "--run-dir", str(tmp_path / "run"),
                        cwd=tmp_path, data=b"one\ntwo\nthree\n")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        assert rank_lines(r.stdout, rank) == [f"rank {rank} got 'one'", f"rank {rank} got 'two'",
                                              f"rank {rank} got 'three'", f"rank {rank} eof after 3 lines"]


@pytest.mark.slow
def test_default_is_none_every_rank_reads_dev_null(tmp_path):
    r = orch_with_input("run", str(ECHO), "-n", "2", "--run-dir", str(tmp_path / "run"),
                        cwd=tmp_path, data=b"not for the ranks\n")
    assert r.returncode == 0, r.stderr
    assert rank_lines(r.stdout, 0) == ["rank 0 eof after 0 lines"]
    assert rank_lines(r.stdout, 1) == ["rank 1 eof after 0 lines"]


@pytest.mark.slow
def test_binary_input_larger_than_a_chunk_and_a_pipe_arrives_intact(tmp_path):
    """300 KiB of every byte value (control-line lookalikes included): chunking, base64 and the guard's buffer."""
    data = (bytes(range(256)) * 1200) + b"\ngo\nrelease\nstdin-eof\ndump\n"
    r = orch_with_input("run", str(DIGEST), "-n", "2", "--stdin", "all", "--run-dir", str(tmp_path / "run"),
                        cwd=tmp_path, data=data)
    assert r.returncode == 0, r.stderr
    want = f"read {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}"
    assert rank_lines(r.stdout, 0) == [f"rank 0 {want}"]
    assert rank_lines(r.stdout, 1) == [f"rank 1 {want}"]


@pytest.mark.slow
def test_orch_ends_when_the_ranks_end_though_its_stdin_stays_open(tmp_path):
    """The reader of orch's stdin must not keep orch alive (a terminal nobody types into)."""
    p = subprocess.Popen(orch_argv("run", str(SCRIPTS / "env_report.py"), "-n", "1", "--stdin", "rank0",
                                   "--run-dir", str(tmp_path / "run")),
                         cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        p.wait(timeout=60)
        assert p.returncode == 0, p.stderr.read().decode()
    finally:
        p.stdin.close()
        kill_tree(p.pid)


@pytest.mark.slow
def test_controller_sigkill_still_stops_a_rank_blocked_on_its_stdin(tmp_path):
    """Teardown on controller loss is unchanged with --stdin: the control channel's EOF stops the rank."""
    rd = tmp_path / "run"
    p = subprocess.Popen(orch_argv("run", str(ECHO), "-n", "2", "--stdin", "rank0", "--run-dir", str(rd),
                                   "--", "--then-sleep", "300"),
                         cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    pids: list[int] = []
    try:
        p.stdin.write(b"ping\n")
        p.stdin.flush()
        wait_for_line(p, "rank 0 got 'ping'", timeout=60)  # rank 0 is now blocked reading its stdin
        wait_for_line_in_log(rd / "events.jsonl", '"kind":"spawned"', count=2)
        pids = [e["pid"] for e in events(rd) if e.get("kind") == "spawned"]
        assert len(pids) == 2 and not set(pids) - set(alive(pids))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        assert not alive(pids, timeout=10), "a rank outlived its SIGKILLed controller"
    finally:
        p.stdin.close()
        kill_tree(p.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for_line_in_log(path: Path, needle: str, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count(needle) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} x{count} not in {path} within {timeout}s")


def test_bad_stdin_choice_is_one_line_exit_2(tmp_path):
    r = subprocess.run(orch_argv("run", str(ECHO), "-n", "1", "--stdin", "rank1"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--stdin" in r.stderr and "rank0" in r.stderr


# ----------------------------------------------------------------------------- the guard alone


def _guard(cmd: list[str], env_stdin: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_STDIN", None)
    if env_stdin:
        env["ORCH_STDIN"] = env_stdin
    return subprocess.Popen([sys.executable, "-S", "-m", "orchestrator.runtime.guard", "--", *cmd], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _line(data: bytes) -> bytes:
    return b"stdin " + base64.b64encode(data) + b"\n"


def test_guard_feeds_framed_bytes_and_never_reads_them_as_control_words():
    """User bytes that spell control words reach the rank as bytes; stdin-eof ends its input, the rank exits 0."""
    p = _guard([sys.executable, "-c", "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d)"], "pipe")
    try:
        payload = b"go\nrelease\ndump\nstdin-eof\n\x00\xff"
        p.stdin.write(_line(payload[:7]) + b"stdin !!not-base64!!\n" + _line(payload[7:]) + b"stdin-eof\n")
        p.stdin.flush()
        out = p.stdout.read()  # the rank exits at its end of file; the guard mirrors it and closes stdout
        assert p.wait(timeout=30) == 0
        assert out == payload
    finally:
        p.kill()
        p.wait(timeout=10)


def test_guard_without_orch_stdin_gives_the_rank_dev_null_and_drops_stdin_lines():
    p = _guard([sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"], None)
    try:
        p.stdin.write(_line(b"secret\n") + b"stdin-eof\n")
        p.stdin.flush()
        out = p.stdout.read()
        assert p.wait(timeout=30) == 0
        assert out.decode().strip() == "''"
    finally:
        p.kill()
        p.wait(timeout=10)


def test_guard_channel_eof_still_stops_a_rank_reading_its_stdin():
    p = _guard([sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(300)"], "pipe")
    try:
        p.stdin.write(_line(b"partial input, no end\n"))
        p.stdin.flush()
        p.stdin.close()  # the controller is gone
        assert p.wait(timeout=30) == -signal.SIGTERM  # the guard mirrors its rank, stopped by SIGTERM
    finally:
        p.kill()
        p.wait(timeout=10)


# ----------------------------------------------------------------------------- MPI


def _have_mpirun() -> bool:
    try:
        from orchestrator.launch.mpi import find_mpi

        find_mpi(None)
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _have_mpirun(), reason="needs Open MPI's mpirun")
def test_mpi_rank0_reads_orch_stdin_through_mpirun_with_end_of_file(tmp_path):
    """mpirun forwards its stdin to rank 0 but never its end of file: our stdin-eof line brings it."""
    r = orch_with_input("run", str(ECHO), "-n", "2", "--backend", "mpi", "--stdin", "rank0",
                        "--run-dir", str(tmp_path / "run"), cwd=tmp_path, data=b"hello\nworld\n", timeout=120)
    assert r.returncode == 0, r.stderr
    assert rank_lines(r.stdout, 0) == ["rank 0 got 'hello'", "rank 0 got 'world'", "rank 0 eof after 2 lines"]
    assert rank_lines(r.stdout, 1) == ["rank 1 eof after 0 lines"]


def test_mpi_stdin_all_is_refused_in_one_line(tmp_path):
    r = subprocess.run(orch_argv("run", str(ECHO), "-n", "2", "--backend", "mpi", "--stdin", "all",
                                 "--run-dir", str(tmp_path / "run")),
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "--stdin all" in r.stderr and "--stdin rank0" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- over SSH (netns hosts, real sshd)

c2 = make_cluster_fixture(2, scope="module", name="c2")


def _ssh_args(c, tmp_path: Path, run_dir: Path, *extra: str) -> list[str]:
    hosts = [{"ssh": h.name, "ips": [f"{h.left_ip}/30", f"{h.right_ip}/30"]} for h in c.hosts]
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "ring", "hosts": hosts}))
    return ["run", str(ECHO), "--hostfile", str(hf), "--ssh-config", c.ssh_config_path, "--known-hosts",
            str(c.known_hosts_path), "--python", sys.executable, "--run-dir", str(run_dir), *extra]


def _hosts_clean(c, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        left = c.running_processes()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(180)
def test_ssh_stdin_all_reaches_both_remote_ranks_then_end_of_file(c2, tmp_path):
    r = orch_with_input(*_ssh_args(c2, tmp_path, tmp_path / "run", "--stdin", "all"), cwd=tmp_path,
                        data=b"over\nssh\n", timeout=120)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        assert rank_lines(r.stdout, rank) == [f"rank {rank} got 'over'", f"rank {rank} got 'ssh'",
                                              f"rank {rank} eof after 2 lines"]
    assert not _hosts_clean(c2)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(180)
def test_ssh_controller_sigkill_with_stdin_leaves_no_remote_rank(c2, tmp_path):
    rd = tmp_path / "run"
    p = subprocess.Popen(orch_argv(*_ssh_args(c2, tmp_path, rd, "--stdin", "rank0"), "--", "--then-sleep", "300"),
                         cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        p.stdin.write(b"ping\n")
        p.stdin.flush()
        wait_for_line(p, "rank 0 got 'ping'", timeout=90)  # rank 0 blocked on its stdin, rank 1 sleeping
        assert c2.running_processes()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        assert not _hosts_clean(c2, timeout=15), "a remote rank outlived its SIGKILLed controller"
    finally:
        p.stdin.close()
        kill_tree(p.pid)
        for pid, _ in c2.running_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_a_rank_waiting_for_typed_input_is_not_an_idle_hang(tmp_path):
    """With --stdin, silence without CPU is a person not typing yet: the idle-hang watchdog stays off."""
    rd = tmp_path / "run"
    p = subprocess.Popen(orch_argv("run", str(ECHO), "-n", "1", "--stdin", "rank0", "--hang-timeout", "1",
                                   "--run-dir", str(rd)),
                         cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        wait_for_line_in_log(rd / "events.jsonl", '"kind":"spawned"')
        time.sleep(4)  # four hang timeouts without a keystroke
        out, err = p.communicate(b"typed at last\n", timeout=60)
        assert p.returncode == 0, err.decode()
        assert "rank 0 got 'typed at last'" in out.decode() and "hang" not in err.decode()
    finally:
        kill_tree(p.pid)


@pytest.mark.slow
def test_pdb_on_rank0_is_driven_through_orch_stdin(tmp_path):
    """mlx.launch users debug with pdb: a breakpoint on rank 0 reads its commands from orch's stdin."""
    p = subprocess.Popen(orch_argv("run", str(SCRIPTS / "pdb_stop.py"), "-n", "2", "--stdin", "rank0",
                                   "--run-dir", str(tmp_path / "run")),
                         cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, env={**os.environ, "PYTHONBREAKPOINT": "pdb.set_trace"})
    try:
        out, err = p.communicate(b"p answer + 1000\nanswer = 7\nc\n", timeout=90)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        raise
    out = out.decode()
    assert p.returncode == 0, err.decode()
    assert "1042" in out  # pdb evaluated what was typed
    assert "rank 0 finished, answer=7" in out and "rank 1 finished, answer=42" in out


@pytest.mark.slow
@pytest.mark.parametrize("script", [DIGEST, SCRIPTS / "stdin_forger.py"], ids=["honest", "forged-ack"])
def test_a_rank_that_does_not_read_holds_orch_input_back_and_loses_nothing(tmp_path, script):
    """Flow control: orch takes only about STDIN_WINDOW bytes ahead of what the rank has read, then everything
    arrives. A rank that prints a fake ``stdin_read`` (I read it all) changes nothing: only the guard's count."""
    import threading

    from orchestrator import protocol

    go = tmp_path / "go"
    rd = tmp_path / "run"
    data = hashlib.sha256(b"seed").digest() * (2 << 20)  # 64 MiB
    p = subprocess.Popen(orch_argv("run", str(script), "-n", "1", "--stdin", "rank0", "--run-dir", str(rd),
                                   "--", "--wait-for", str(go)),
                         cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    written = [0]

    def feed() -> None:
        try:
            for i in range(0, len(data), 1 << 16):
                p.stdin.write(data[i:i + (1 << 16)])
                p.stdin.flush()
                written[0] = i + (1 << 16)
            p.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        # Wait until orch stops taking input (bounded): the rank reads nothing yet.
        last, still_since, deadline = -1, time.monotonic(), time.monotonic() + 30
        while time.monotonic() < deadline and written[0] < len(data):
            if written[0] != last:
                last, still_since = written[0], time.monotonic()
            elif time.monotonic() - still_since > 2:
                break
            time.sleep(0.05)
        # Window + the relay's chunks + pipe and socket buffers on the way; far below the 64 MiB offered.
        assert written[0] < protocol.STDIN_WINDOW + (8 << 20), f"orch took {written[0]} bytes from a rank that reads none"
        go.write_text("read now")
        writer.join(timeout=120)
        assert not writer.is_alive()
        p.stdin = None  # the writer closed it
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert f"rank 0 read {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}" in out.decode()
        kinds = [e["kind"] for e in events(rd)]
        assert kinds.count("forged:stdin_read") == (script != DIGEST)
    finally:
        kill_tree(p.pid)


@pytest.mark.slow
def test_a_restarted_attempt_finds_the_input_already_ended(tmp_path):
    """orch's stdin ended during attempt 0: attempt 1's rank reads end of file at once instead of waiting forever."""
    rd = tmp_path / "run"
    r = orch_with_input("run", str(ECHO), "-n", "1", "--stdin", "rank0", "--max-restarts", "1", "--restart-backoff", "0",
                        "--run-dir", str(rd), "--", "--crash-once", str(tmp_path / "crashed"),
                        cwd=tmp_path, data=b"only once\n")
    assert r.returncode == 0, r.stderr
    assert rank_lines(r.stdout, 0) == ["rank 0 got 'only once'", "rank 0 eof after 1 lines", "rank 0 crashing once",
                                       "rank 0 eof after 0 lines"]
    assert [a["status"] for a in summary(rd)["attempts"]] == ["failed", "succeeded"]


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(180)
@pytest.mark.skipif(not _have_mpirun(), reason="needs Open MPI's mpirun")
def test_mpi_over_ssh_rank0_on_a_remote_host_reads_orch_stdin(c2, tmp_path):
    """mpirun's own ssh starts the ranks on the namespace hosts; its stdin forwarding reaches rank 0 there."""
    hf = tmp_path / "hosts.json"
    hf.write_text(json.dumps({"backend": "mpi", "hosts": [
        {"ssh": h.name, "ips": [h.mgmt_ip], "python": sys.executable} for h in c2.hosts]}))
    rd = tmp_path / "run"
    r = orch_with_input("run", str(ECHO), "--hostfile", str(hf), "--ssh-config", str(c2.ssh_config_path),
                        "--stdin", "rank0", "--run-dir", str(rd), cwd=tmp_path, data=b"via mpirun\n", timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rank_lines(r.stdout, 0) == ["rank 0 got 'via mpirun'", "rank 0 eof after 1 lines"]
    assert rank_lines(r.stdout, 1) == ["rank 1 eof after 0 lines"]
    hosts = {e["rank"]: e["host"] for e in events(rd) if e["kind"] == "spawned"}
    assert hosts == {0: "host0", 1: "host1"}
    assert not _hosts_clean(c2)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.timeout(180)
def test_ssh_input_beyond_the_flow_control_window_arrives_intact_on_both_hosts(c2, tmp_path):
    data = hashlib.sha256(b"ssh").digest() * (384 << 10)  # 12 MiB: three windows' worth
    args = _ssh_args(c2, tmp_path, tmp_path / "run", "--stdin", "all")
    args[1] = str(DIGEST)
    r = orch_with_input(*args, cwd=tmp_path, data=data, timeout=150)
    assert r.returncode == 0, r.stderr
    want = f"read {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}"
    assert rank_lines(r.stdout, 0) == [f"rank 0 {want}"] and rank_lines(r.stdout, 1) == [f"rank 1 {want}"]
    assert not _hosts_clean(c2)
