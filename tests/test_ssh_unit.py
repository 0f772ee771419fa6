"""The SSH launcher's parts, fast: command quoting (through a real ``sh``), error messages, host keys,
staging and collection path safety. Remote hosts here are an in-process asyncssh server on 127.0.0.1
(SFTP chrooted into a temp dir), so no root or namespaces are needed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from orchestrator.remote.ssh import asyncssh
import pytest

from orchestrator.hostfile import Host, Hostfile
from orchestrator.launch.base import ExitStatus, LaunchError, RankSpec
from orchestrator.launch.ssh import SSHLauncher, SSHRank
from orchestrator.launch.ssh_commands import (
    RELEASE,
    build_command,
    config_line,
    exit_signal_status,
    kill_group_command,
    rank_command,
    release_lines,
    remote_env,
    signal_number,
)
from orchestrator.remote import collect, sites, manifest, stager
from orchestrator.remote.sites import HostLink, Site
from orchestrator.remote.ssh import Connection, SSHOptions, describe_connect_error
from orchestrator.runtime import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent

@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the local hash cache


HOSTILE = [
    "a b", "it's", '"dq"', "$(touch PWNED)", "`touch PWNED2`", "line1\nline2", "back\\slash", ";echo x",
    "*", "~", "$HOME", "", "-n", "tab\there", "ünïcode", "a=b", "'", "$((1+1))", "!event",
]


# ----------------------------------------------------------------------------- command line


def _site(tmp_path: Path, code_dir: Path, run_dir: Path) -> Site:
    link = HostLink(ssh=Connection(name="remote1"), home="/", runtime_dir=str(REPO))
    return Site(index=0, link=link, label="remote1", stage_code=True,
                run_root=str(tmp_path), code_dir=str(code_dir), run_dir=str(run_dir))


DUMP = r"""
import json, os, sys
keys = [k for k in os.environ if k.startswith("HOSTILE_")] + ["ORCH_RUN_DIR", "MLX_RANK"]
hostfile = os.environ.get("MLX_HOSTFILE")
print(json.dumps({
    "argv": sys.argv[1:],
    "env": {k: os.environ.get(k) for k in keys},
    "cwd": os.getcwd(),
    "hostfile": open(hostfile).read() if hostfile else None,
    "has_json_var": "ORCH_MLX_HOSTFILE_JSON" in os.environ,
}))
"""


@pytest.mark.parametrize("deferred", [False, True], ids=["plain", "deferred"])
def test_command_survives_hostile_values_through_a_real_shell(tmp_path, monkeypatch, deferred):
    """Build the remote line for hostile args/env/cwd and run it with `sh -c` here: everything arrives intact.

    Deferred (how ``prepare`` opens a first attempt's sessions): the released guard starts its rank at once,
    and the program and its arguments arrive later in the configuration line, as ``start`` sends it."""
    code_dir = tmp_path / "co de's \"dir\" $(x) `y`"
    code_dir.mkdir()
    (code_dir / "dump.py").write_text(DUMP)
    run_dir = tmp_path / "run dir;$HOME"
    monkeypatch.setenv("ORCH_TEST_LOCAL_ONLY", "leak")  # the local environment must not be shipped
    env = {f"HOSTILE_{i}": v for i, v in enumerate(HOSTILE)}
    env.update(MLX_RANK="3", ORCH_RUN_DIR="/local/run/dir", MLX_HOSTFILE="/local/only/hostfile.json")
    hostfile_json = json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5001 $(boom)"]])
    spec = RankSpec(rank=3, host="remote1", script="/local/path/dump.py", script_args=list(HOSTILE),
                    python=sys.executable, env=env, mlx_hostfile_json=hostfile_json)
    site = _site(tmp_path, code_dir, run_dir)
    cmd = rank_command(spec, site, deferred=deferred)

    assert "ORCH_TEST_LOCAL_ONLY" not in cmd and "/local/only/hostfile.json" not in cmd
    assert cmd.startswith("read -r orch_go && cd ") and " && exec env " in cmd
    assert ("--deferred" in cmd) == deferred and ("dump.py" in cmd) != deferred
    # stdin stays open while the rank runs, as an SSH session's does (EOF would tell the guard to stop it).
    p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=tmp_path)
    try:
        # What start() sends: the shell's release line, then the guard's token line; the rank sees neither.
        if deferred:
            p.stdin.write(RELEASE.decode())
            p.stdin.flush()
            p.stdin.write(config_line(spec, site, "ab" * 16).decode())
        else:
            p.stdin.write(release_lines("ab" * 16).decode())
        p.stdin.flush()
        stdout, stderr = p.stdout.read(), p.stderr.read()
        assert p.wait(timeout=30) == 0, stderr
    finally:
        p.stdin.close()
        if p.poll() is None:
            p.kill()
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["argv"] == HOSTILE
    assert out["cwd"] == str(code_dir)
    for i, v in enumerate(HOSTILE):
        assert out["env"][f"HOSTILE_{i}"] == v
    assert out["env"]["ORCH_RUN_DIR"] == str(run_dir)  # rewritten to the remote run dir
    assert out["env"]["MLX_RANK"] == "3"
    assert out["hostfile"] == hostfile_json and not out["has_json_var"]  # the bootstrap materialised it
    assert not list(tmp_path.rglob("PWNED*")) and not list(code_dir.rglob("PWNED*"))


def test_remote_env_is_spec_env_adapted():
    spec = RankSpec(rank=0, host="h", script="s.py", env={"A": "1", "MLX_HOSTFILE": "/tmp/x", "ORCH_RUN_DIR": "/l",
                                                         "PYTHONPATH": "/user/lib"}, mlx_hostfile_json="[]")
    env = remote_env(spec, run_dir="/r/run", pythonpath="/r/rt")
    assert env == {"A": "1", "ORCH_RUN_DIR": "/r/run", "PYTHONPATH": "/r/rt:/user/lib", "ORCH_MLX_HOSTFILE_JSON": "[]"}
    spec.mlx_hostfile_json = None
    assert "ORCH_MLX_HOSTFILE_JSON" not in remote_env(spec, run_dir="/r", pythonpath="/p")


def test_bad_env_name_is_refused():
    with pytest.raises(LaunchError, match="cannot be passed"):
        build_command(["python"], {"BAD NAME": "x"}, "/")


def test_command_for_cwd_runs_the_script_in_place(tmp_path):
    spec = RankSpec(rank=0, host="remote1", script="/shared/code/train.py", cwd="/shared/code", env={})
    cmd = rank_command(spec, _site(tmp_path, tmp_path / "code", tmp_path / "run"))
    assert cmd.startswith("read -r orch_go && cd /shared/code && exec env ")
    assert cmd.endswith("python3 -m orchestrator.runtime.bootstrap /shared/code/train.py")


# ----------------------------------------------------------------------------- exit statuses


class _FakeProc:
    def __init__(self, status=None, sig=None):
        self.exit_status = status
        self.exit_signal = sig
        self.stdout = self.stderr = None
        self._closed = asyncio.Event()

    async def wait_closed(self):
        await self._closed.wait()


def test_signal_names_map_to_numbers():
    assert signal_number("KILL") == 9 and signal_number("TERM") == 15 and signal_number("SIGINT") == 2
    assert signal_number("NOPE") == 99


@pytest.mark.parametrize("name, words", [
    ("TRAP", "killed by SIGTRAP"), ("BUS", "killed by SIGBUS"), ("SIGSEGV", "killed by SIGSEGV"),
    ("SIG@openssh.com", "killed by a signal reported as 'SIG@openssh.com'"),  # OpenSSH's name for SIGTRAP, SIGBUS...
    ("INFO", "killed by SIGINFO"),  # a macOS signal Linux does not have
    ("", "killed by signal 99"),
])
def test_any_ssh_signal_name_gives_a_readable_status(name, words):
    st = exit_signal_status(name)
    assert st.how == words and st.signal is not None and st.shell_code >= 128 and not st.ok


def test_the_token_follows_the_release_line():
    assert release_lines("ab" * 16) == b"start\ntoken " + b"ab" * 16 + b"\n"


@pytest.mark.parametrize("pid", [None, 0, 1, -1, True, "12"])
def test_no_kill_command_for_a_pid_that_is_not_a_rank(pid):
    assert kill_group_command(pid) is None


def test_remote_kill_reaches_only_a_group_the_guard_still_owns(tmp_path):
    """The remote kill line, run by a real sh here: it kills a guard's rank group, never a stranger's."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    guard = subprocess.Popen([sys.executable, "-S", "-m", "orchestrator.runtime.guard", "--", sys.executable, "-c",
                              "import os, time; print(os.getpid(), flush=True); time.sleep(60)"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        rank = int(guard.stdout.readline())
        subprocess.run(["sh", "-c", kill_group_command(stranger.pid)], check=True, timeout=30)
        assert stranger.poll() is None, "killed a process that is no guard's rank"
        subprocess.run(["sh", "-c", kill_group_command(rank)], check=True, timeout=30)
        assert guard.wait(timeout=30) != 0  # its rank was SIGKILLed; the guard ends with it
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(rank, 0)
                import time
                time.sleep(0.05)
    finally:
        for p in (stranger, guard):
            p.kill()
            p.wait()


def test_kill_signals_nothing_without_an_authenticated_pid():
    class Conn:
        def __init__(self):
            self.ran = []

        async def run(self, command, check=False):
            self.ran.append(command)

    class Proc:
        stdout = stderr = None

        def close(self):
            pass

    async def go():
        conn = Conn()
        spec = RankSpec(rank=0, host="mac2", script="s.py")
        handle = SSHRank(spec, Connection(name="mac2", conn=conn), Proc())
        handle.rank_pid = 4242  # but no token: a pid that cannot have come from the guard
        handle.kill()
        handle.token, handle.rank_pid = "ab" * 16, 1
        handle.kill()
        handle.rank_pid = 4242
        handle.kill()
        await asyncio.sleep(0.05)
        return conn.ran

    ran = asyncio.run(go())
    assert len(ran) == 1 and "p=4242;" in ran[0] and "kill -KILL -$p " in ran[0]


def test_wait_maps_status_signal_and_lost_connection():
    async def go():
        spec = RankSpec(rank=1, host="mac2", script="s.py")
        results = []
        for status, sig in ((3, None), (-1, ("TERM", False, "", ""))):
            link = Connection(name="mac2")
            proc = _FakeProc(status, sig)
            proc._closed.set()
            results.append(await SSHRank(spec, link, proc, None).wait())
        link = Connection(name="mac2", conn=object())
        proc = _FakeProc()  # the session never closes by itself: the connection is what goes
        handle = SSHRank(spec, link, proc, None)
        waiter = asyncio.ensure_future(handle.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        link.lost_exc = asyncssh.ConnectionLost("Server not responding to keepalive")
        link.gone.set()
        results.append(await asyncio.wait_for(waiter, 2))
        return results

    code, sig, lost = asyncio.run(go())
    assert code == ExitStatus(code=3, signal=None)
    assert sig == ExitStatus(code=None, signal=15)
    assert lost.code == 255 and lost.signal is None
    assert lost.reason == "lost the SSH connection to mac2 (no answer to keepalives)"


# ----------------------------------------------------------------------------- error messages


@pytest.mark.parametrize("exc, needle", [
    (asyncio.TimeoutError(), "no answer within 5s"),
    (socket.gaierror(-2, "Name or service not known"), "cannot resolve the host name"),
    (ConnectionRefusedError(111, "Connect call failed ('10.0.0.7', 22)"), "connection refused at 10.0.0.7:22"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "no route to the host"),
    (asyncssh.PermissionDenied("Permission denied"), "authentication failed as alice"),
    (asyncssh.ConnectionLost("closed"), "closed the connection during the SSH handshake"),
])
def test_connect_errors_in_words(exc, needle):
    msg = describe_connect_error(exc, timeout=5, user="alice")
    assert needle in msg
    assert "\n" not in msg and "Traceback" not in msg


def test_host_key_messages_tell_unknown_from_changed():
    exc = asyncssh.HostKeyNotVerifiable("Host key is not trusted for host x")
    unknown = describe_connect_error(exc, timeout=5, known_hosts="/k/known_hosts", key_problem="unknown")
    changed = describe_connect_error(exc, timeout=5, known_hosts="/k/known_hosts", key_problem="changed")
    assert "not in /k/known_hosts" in unknown and "--ssh-accept-new" in unknown
    assert "CHANGED" in changed and "ssh-keygen -R" in changed and "--ssh-accept-new" not in changed


# ----------------------------------------------------------------------------- a real (in-process) SSH server


class _Server:
    """asyncssh server on 127.0.0.1 with SFTP chrooted to ``root``; one client key is authorised."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "remote-fs"
        self.root.mkdir()
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key_path = tmp_path / "id_ed25519"
        self.client_key.write_private_key(str(self.client_key_path))
        self.ssh_config = tmp_path / "ssh_config"
        self.ssh_config.write_text("")
        self.server = None
        self.port = None
        self.commands: list[str] = []

    async def __aenter__(self):
        root = str(self.root)
        self.server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[self.host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(self.client_key.export_public_key().decode()),
            sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=root),
            process_factory=self._session,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _session(self, process) -> None:
        """A rank session: remember the command, wait for its release line or EOF (nothing is executed)."""
        self.commands.append(process.command)
        try:
            await process.stdin.readline()
        except (asyncssh.Error, OSError):
            pass
        process.exit(0)

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    def known_hosts_line(self, key=None) -> str:
        key = key or self.host_key
        return f"[127.0.0.1]:{self.port} " + " ".join(key.export_public_key().decode().split()[:2]) + "\n"

    def launcher(self, known_hosts: Path, script: Path, *, accept_new=False, extra_hosts=(), connect_timeout=2.0) -> SSHLauncher:
        hosts = [Host(name="127.0.0.1", port=self.port), *extra_hosts]
        ssh = SSHOptions(ssh_config=str(self.ssh_config), known_hosts=str(known_hosts),
                         identity=[str(self.client_key_path)], accept_new=accept_new, connect_timeout=connect_timeout)
        launcher = SSHLauncher(Hostfile(hosts=hosts), ssh, err=open(os.devnull, "w"))
        return launcher


def _specs(script: Path, run_dir: Path, n_hosts: int = 1) -> list[RankSpec]:
    run_dir.mkdir(parents=True, exist_ok=True)
    return [RankSpec(rank=i, host=f"h{i}", host_index=i, script=str(script), env={"ORCH_RUN_DIR": str(run_dir)})
            for i in range(n_hosts)]


@pytest.fixture
def project(tmp_path):
    d = tmp_path / "project"
    (d / "data").mkdir(parents=True)
    (d / "train.py").write_text("print('hi')\n")
    (d / "data" / "x.txt").write_text("data\n")
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"junk")
    return d


def test_staging_uploads_once_then_nothing(tmp_path, project, monkeypatch):
    async def go():
        async with _Server(tmp_path) as srv:
            kh = tmp_path / "known_hosts"
            kh.write_text(srv.known_hosts_line())
            first = srv.launcher(kh, project / "train.py")
            await first.prepare(_specs(project / "train.py", tmp_path / "runs" / "one"))
            cmd = first.command_for(first.specs[0])
            await first.aclose()
            second = srv.launcher(kh, project / "train.py")
            await second.prepare(_specs(project / "train.py", tmp_path / "runs" / "two"))
            trash = srv.root / ".cache" / "mlx-orch" / "runs"
            assert sorted(p.name.split("-")[0] for p in trash.iterdir()) == [".trash", "two"]  # the first run, retired
            await sites.purge_trash(second.links.values())  # what a started run does in the background
            assert [p.name.split("-")[0] for p in trash.iterdir()] == ["two"]
            site = second.sites[0]
            staged = sorted(p.relative_to(srv.root / site.code_dir.lstrip("/")).as_posix()
                            for p in (srv.root / site.code_dir.lstrip("/")).rglob("*") if p.is_file())
            await second.aclose()
            ranks = [c for c in srv.commands if "orch_stage" not in c]  # the staging helper's own commands aside
            assert len(ranks) == 2 and all(c.startswith("read -r orch_go && cd ") for c in ranks)
            return first.stats, second.stats, staged, cmd

    s1, s2, staged, cmd = asyncio.run(go())
    assert s1["uploaded_files"] >= 2 and not s1["hosts"]["127.0.0.1"]["runtime_reused"]
    assert s2["uploaded_files"] == 0 and s2["uploaded_bytes"] == 0
    assert s2["hosts"]["127.0.0.1"]["runtime_reused"] and s2["hosts"]["127.0.0.1"]["placed"] == {"code": 2}
    assert s1["hosts"]["127.0.0.1"]["uploaded"]["code"] == 2 and s1["hosts"]["127.0.0.1"]["uploaded"]["runtime"] >= 5
    assert staged == ["data/x.txt", "train.py"]  # caches are not shipped
    assert "/.cache/mlx-orch/runtime/" in cmd and "/.cache/mlx-orch/runs/one-" in cmd
    assert json.loads((tmp_path / "runs" / "two" / "staging.json").read_text())["uploaded_files"] == 0
    # The run directories are retired after the run; the content-addressed caches stay.
    assert all(p.name.startswith(".trash-") for p in (tmp_path / "remote-fs" / ".cache" / "mlx-orch" / "runs").iterdir())
    assert any((tmp_path / "remote-fs" / ".cache" / "mlx-orch" / "objects").iterdir())


def test_unknown_host_key_is_refused_then_accept_new_records_it(tmp_path, project):
    async def go():
        async with _Server(tmp_path) as srv:
            kh = tmp_path / "known_hosts"
            kh.write_text("")
            with pytest.raises(LaunchError) as refused:
                await srv.launcher(kh, project / "train.py").prepare(_specs(project / "train.py", tmp_path / "r1"))
            assert kh.read_text() == ""
            accepting = srv.launcher(kh, project / "train.py", accept_new=True)
            await accepting.prepare(_specs(project / "train.py", tmp_path / "r2"))
            await accepting.aclose()
            return str(refused.value), kh.read_text(), srv.known_hosts_line()

    refused, recorded, expected = asyncio.run(go())
    assert refused.startswith("cannot reach 1 of 1 host: 127.0.0.1: host key not verifiable")
    assert "--ssh-accept-new" in refused
    assert recorded == expected


def test_changed_host_key_is_refused_even_with_accept_new(tmp_path, project):
    async def go():
        async with _Server(tmp_path) as srv:
            kh = tmp_path / "known_hosts"
            kh.write_text(srv.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519")))
            before = kh.read_text()
            with pytest.raises(LaunchError) as e:
                await srv.launcher(kh, project / "train.py", accept_new=True).prepare(_specs(project / "train.py", tmp_path / "r"))
            return str(e.value), before, kh.read_text()

    msg, before, after = asyncio.run(go())
    assert "127.0.0.1: host key CHANGED" in msg and "\n" not in msg
    assert before == after


def test_every_unreachable_host_is_named_in_one_line(tmp_path, project):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP, never speaks SSH: a hung host
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()

    async def go():
        async with _Server(tmp_path) as srv:
            kh = tmp_path / "known_hosts"
            kh.write_text(srv.known_hosts_line())
            launcher = srv.launcher(kh, project / "train.py", extra_hosts=[
                Host(name="no-such-host.invalid"),
                Host(name="127.0.0.1", port=closed_port),
                Host(name="127.0.0.1", port=silent.getsockname()[1]),
            ], connect_timeout=1.0)
            with pytest.raises(LaunchError) as e:
                await launcher.prepare(_specs(project / "train.py", tmp_path / "r", n_hosts=4))
            await launcher.aclose()
            return str(e.value)

    try:
        msg = asyncio.run(go())
    finally:
        silent.close()
    assert msg.startswith("cannot reach 3 of 4 hosts: ")
    assert "no-such-host.invalid: cannot resolve the host name" in msg
    assert f"127.0.0.1: connection refused at 127.0.0.1:{closed_port}" in msg
    assert "127.0.0.1: no answer within 1s" in msg
    assert "\n" not in msg


def test_authentication_failure_is_named(tmp_path, project):
    async def go():
        async with _Server(tmp_path) as srv:
            kh = tmp_path / "known_hosts"
            kh.write_text(srv.known_hosts_line())
            asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(srv.client_key_path))  # not authorised
            with pytest.raises(LaunchError) as e:
                await srv.launcher(kh, project / "train.py").prepare(_specs(project / "train.py", tmp_path / "r"))
            return str(e.value)

    assert "127.0.0.1: authentication failed" in asyncio.run(go())


def test_a_host_refusing_sessions_is_explained(tmp_path, project, monkeypatch):
    async def refuse(self, *args, **kwargs):  # what sshd answers beyond MaxSessions
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed")

    monkeypatch.setattr(asyncssh.SSHClientConnection, "create_process", refuse)

    async def go():
        async with _Server(tmp_path) as srv:
            kh = tmp_path / "known_hosts"
            kh.write_text(srv.known_hosts_line())
            launcher = srv.launcher(kh, project / "train.py")
            with pytest.raises(LaunchError) as e:
                await launcher.prepare(_specs(project / "train.py", tmp_path / "r"))
            await launcher.aclose()
            return str(e.value)

    msg = asyncio.run(go())
    assert msg.startswith("127.0.0.1 refused SSH session 2 of 2 (open failed)") and "MaxSessions" in msg


# ----------------------------------------------------------------------------- local trees


def test_code_tree_skips_caches_and_places_staged_paths(tmp_path):
    d = tmp_path / "proj"
    for rel in ("train.py", "sub/b.py", ".git/config", "runs/x/log", "__pycache__/a.pyc", "c.pyc",
                ".pytest_cache/v", "pkg.egg-info/PKG-INFO", "tool.sh"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(rel)
    (d / "tool.sh").chmod(0o755)
    outside = tmp_path / "shared-data"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"\0" * 10)
    tree = manifest.code_tree(d, [str(outside), str(d / "sub")], manifest.HashCache(tmp_path / "h.json"))
    assert [f.rel for f in tree.files] == ["shared-data/big.bin", "sub/b.py", "tool.sh", "train.py"]
    assert next(f for f in tree.files if f.rel == "tool.sh").object_name.endswith(".x")
    assert tree.dirs == ["shared-data", "sub"]
    again = manifest.code_tree(d, [str(outside), str(d / "sub")], manifest.HashCache(tmp_path / "h.json"))
    assert again.digest == tree.digest


def test_runtime_tree_is_the_runtime_only():
    rels = {f.rel for f in manifest.runtime_tree().files}
    assert {"orchestrator/__init__.py", "orchestrator/protocol.py", "orchestrator/runtime/guard.py",
            "orchestrator/runtime/bootstrap.py"} <= rels
    assert not any(r.startswith(("orchestrator/launch", "orchestrator/cli", "orchestrator/supervisor")) for r in rels)


def test_a_huge_script_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "MAX_FILES", 3)
    for i in range(5):
        (tmp_path / f"f{i}.py").write_text("x")
    with pytest.raises(manifest.StagingError, match="--cwd"):
        manifest.code_tree(tmp_path, cache=manifest.HashCache(tmp_path / "h.json"))


# ----------------------------------------------------------------------------- collection path safety


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "..\\x", "a\0b", "../../etc/passwd"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(collect.UnsafePath):
        collect.safe_name(name)


class _FakeSFTP:
    """A remote filesystem made of a dict: path -> bytes (file), "DIR", or ("LINK", target)."""

    def __init__(self, tree: dict):
        self.tree = tree

    def _attrs(self, v):
        if v == "DIR":
            return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_DIRECTORY, size=0)
        if isinstance(v, tuple):
            return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_SYMLINK, size=0)
        return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, size=len(v))

    async def readdir(self, path):
        if self.tree.get(path) != "DIR":
            raise asyncssh.SFTPNoSuchFile(path)
        prefix = path.rstrip("/") + "/"
        names = {p[len(prefix):].split("/")[0] for p in self.tree if p.startswith(prefix)}
        names |= set(getattr(self, "extra_names", {}).get(path, []))
        return [asyncssh.SFTPName(n, attrs=self._attrs(self.tree.get(prefix + n, b""))) for n in sorted(names)]

    async def lstat(self, path):
        if path not in self.tree:
            raise asyncssh.SFTPNoSuchFile(path)
        return self._attrs(self.tree[path])

    def open(self, path, mode="rb"):
        data = self.tree[path]

        class F:
            async def __aenter__(s):
                return s

            async def __aexit__(s, *a):
                return False

            async def read(s, n=-1):
                return data

        return F()

    async def get(self, remote, local):
        v = self.tree[remote]
        assert isinstance(v, bytes), f"downloaded a non-file {remote}"
        Path(local).write_bytes(v)


def _ckpt_files(step: int, model=b"M" * 10, opt=b"O" * 7, sizes=None) -> dict:
    sizes = sizes or {ckpt.MODEL_FILE: len(model), ckpt.OPTIMIZER_FILE: len(opt)}
    state = json.dumps({"format": 1, "step": step, "epoch": 0, "offset": 0, "files": sizes}).encode()
    return {ckpt.MODEL_FILE: model, ckpt.OPTIMIZER_FILE: opt, ckpt.STATE_FILE: state}


def test_collection_takes_the_newest_complete_checkpoint_and_refuses_escapes(tmp_path):
    R = "/remote/run"
    tree = {"/remote": "DIR", R: "DIR", f"{R}/checkpoints": "DIR", f"{R}/stats.json": b'{"ok": 1}',
            f"{R}/sub": "DIR", f"{R}/sub/deep.txt": b"deep", f"{R}/link": ("LINK", "/etc/passwd"),
            f"{R}/summary.json": b"remote summary", f"{R}/.tmp-partial": b"x",
            f"{R}/checkpoints/latest.json": json.dumps({"path": "../../../etc"}).encode(),
            f"{R}/checkpoints/step-00000010": "DIR", f"{R}/checkpoints/step-00000020": "DIR",
            f"{R}/checkpoints/step-00000030": "DIR"}
    for name, data in _ckpt_files(10).items():
        tree[f"{R}/checkpoints/step-00000010/{name}"] = data
    for name, data in _ckpt_files(20, sizes={ckpt.MODEL_FILE: 999, ckpt.OPTIMIZER_FILE: 7}).items():
        tree[f"{R}/checkpoints/step-00000020/{name}"] = data  # incomplete: the model is short
    tree[f"{R}/checkpoints/step-00000030/{ckpt.STATE_FILE}"] = b"not json"
    sftp = _FakeSFTP(tree)
    # Names a hostile server could send in a listing.
    sftp.extra_names = {R: ["..", "../escape", "/abs", "a\\b"], f"{R}/sub": ["../../x"]}
    local = tmp_path / "run"
    local.mkdir()
    (local / "summary.json").write_text("controller's")

    async def go():
        report = collect.CollectReport()
        cp = await collect.find_checkpoint(sftp, "h0", R)
        await collect.pull_checkpoint(sftp, cp, local, report)
        await collect.pull_files(sftp, R, local, [], report, fallback_prefix=["hosts", "h0"])
        return cp, report

    cp, report = asyncio.run(go())
    assert cp.name == "step-00000010"
    assert ckpt.validate(local / "checkpoints" / "step-00000010").step == 10
    assert json.loads((local / "checkpoints" / "latest.json").read_text())["path"] == "step-00000010"
    assert not (local / "checkpoints" / "step-00000020").exists()
    assert (local / "stats.json").read_text() == '{"ok": 1}'
    assert (local / "sub" / "deep.txt").read_text() == "deep"
    assert (local / "summary.json").read_text() == "controller's"  # never overwritten
    assert (local / "hosts" / "h0" / "summary.json").read_text() == "remote summary"
    assert not (local / "link").exists() and not (local / ".tmp-partial").exists()
    assert {"'../escape'", "'/abs'", "'a\\\\b'", "'../../x'"} <= set(report.skipped)
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert all(w.startswith("run/") for w in written), written


def test_collection_never_writes_through_a_local_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    local = tmp_path / "run"
    local.mkdir()
    (local / "hosts").symlink_to(outside)
    sftp = _FakeSFTP({"/r": "DIR", "/r/f.txt": b"payload"})
    report = collect.CollectReport()
    asyncio.run(collect.pull_files(sftp, "/r", local, ["hosts", "h1"], report))
    assert not any(outside.iterdir())
    assert report.files == 0 and report.skipped and "symlink" in report.skipped[0]
    with pytest.raises(collect.UnsafePath):
        collect.safe_local_path(local, ["hosts", "h1", "f.txt"])


# ----------------------------------------------------------------------------- the first rank session runs the staging helper


def _helper_payload(tmp_path: Path) -> bytes:
    req = {"objects": str(tmp_path / "objects"), "mtime": stager.OBJECT_MTIME, "commit": [], "trees": [],
           "place": [], "dirs": [str(tmp_path / "made-by-helper")]}
    return json.dumps({"src": stager.HELPER, "req": req}).encode()


def test_first_rank_session_runs_the_helper_then_waits_for_its_release(tmp_path):
    """Through a real shell: the helper reads exactly its framed request, answers, and the rank starts only
    on the release that follows (one login shell per host for both)."""
    code_dir, run_dir = tmp_path / "code", tmp_path / "run"
    code_dir.mkdir()
    (code_dir / "dump.py").write_text(DUMP)
    spec = RankSpec(rank=0, host="remote1", script="/local/path/dump.py", python=sys.executable,
                    env={"ORCH_RUN_DIR": "/l"})
    cmd = rank_command(spec, _site(tmp_path, code_dir, run_dir), helper_python=sys.executable)
    p = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=tmp_path)
    try:
        p.stdin.write(stager.helper_frame(_helper_payload(tmp_path)))
        p.stdin.flush()
        answer = b""
        while b'"missing"' not in answer:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            answer = line
        assert json.loads(answer)["errors"] == [] and (tmp_path / "made-by-helper").is_dir()
        assert p.poll() is None  # waiting for the release, nothing started
        p.stdin.write(release_lines("ab" * 16))
        p.stdin.flush()
        out = p.stdout.read().decode()
        assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        p.stdin.close()
        if p.poll() is None:
            p.kill()
    assert json.loads(out.strip().splitlines()[-1])["env"]["ORCH_RUN_DIR"] == str(run_dir)


def test_a_first_rank_session_whose_helper_never_ran_does_not_start_the_rank(tmp_path):
    """No Python at that path: what the helper did not read must not release the rank."""
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "dump.py").write_text("open('STARTED', 'w')\n")
    spec = RankSpec(rank=0, host="remote1", script="/local/path/dump.py", python=sys.executable, env={})
    cmd = rank_command(spec, _site(tmp_path, code_dir, tmp_path / "run"), helper_python=str(tmp_path / "no-python"))
    p = subprocess.run(["sh", "-c", cmd], input=stager.helper_frame(_helper_payload(tmp_path)) + b"\n",
                       capture_output=True, cwd=tmp_path, timeout=30)
    assert p.returncode != 0
    assert not list(tmp_path.rglob("STARTED")) and not (tmp_path / "made-by-helper").exists()


def test_every_command_builds_the_same_ssh_options_from_its_arguments(tmp_path):
    """orch run, check, env and hostfile take the same SSH flags and turn them into one SSHOptions."""
    from orchestrator.cli import build_parser
    from orchestrator.health.check import ssh_options

    flags = ["--ssh-config", "/c", "--known-hosts", "/k", "-i", "/id1", "-i", "/id2", "--ssh-accept-new"]
    parser = build_parser()
    got = {
        "run": SSHOptions.from_args(parser.parse_args(["run", "x.py", *flags, "--connect-timeout", "7"])),
        "hostfile": SSHOptions.from_args(parser.parse_args(["hostfile", "--hosts", "a,b", *flags, "--connect-timeout", "7"])),
        "check": ssh_options(parser.parse_args(["check", "--hostfile", "h.json", *flags, "--timeout", "7"])),
        "env": ssh_options(parser.parse_args(["env", *flags, "--timeout", "7"])),
    }
    want = SSHOptions(ssh_config="/c", known_hosts="/k", identity=["/id1", "/id2"], accept_new=True, connect_timeout=7)
    assert got == {k: want for k in got}
