"""Staging's object cache cannot be poisoned: objects are read-only, hashed on reuse, and runs get copies.

The remote host here is an in-process asyncssh server on 127.0.0.1 whose SFTP works on the real
filesystem and whose exec channel runs the command in a real ``sh`` (so ``HELPER`` really runs in
a real Python). The defect this guards against: a run's staged files were hard links to the
shared objects, so a script that rewrote its own data file changed it for every later run.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import sys
from pathlib import Path

from orchestrator.remote.ssh import asyncssh
import pytest

from orchestrator.remote import manifest, stager

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the local hash cache


class _Host:
    """An SSH server with real SFTP (no chroot) and real command execution through ``sh -c``."""

    def __init__(self, tmp_path: Path, *, exec_commands: bool = True):
        self.tmp = tmp_path
        self.exec_commands = exec_commands
        self.commands: list[str] = []
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")

    async def _session(self, process) -> None:
        self.commands.append(process.command)
        data = await process.stdin.read()
        if not self.exec_commands:  # an SFTP-only account: the command goes nowhere
            process.exit(1)
            return
        proc = await asyncio.create_subprocess_exec("sh", "-c", process.command, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(data.encode()), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        process.stdout.write(out.decode())
        process.stderr.write(err.decode())
        process.exit(proc.returncode)

    async def __aenter__(self):
        self.server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[self.host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(self.client_key.export_public_key().decode()),
            sftp_factory=True, process_factory=self._session, encoding="utf-8")
        port = self.server.sockets[0].getsockname()[1]
        self.conn = await asyncssh.connect("127.0.0.1", port, known_hosts=None, client_keys=[self.client_key],
                                           config=None)
        self.sftp = await self.conn.start_sftp_client()
        return self

    async def __aexit__(self, *exc):
        self.sftp.exit()
        self.conn.close()
        await self.conn.wait_closed()
        self.server.close()
        await self.server.wait_closed()

    def stager(self, base: Path, **kw) -> stager.RemoteStager:
        return stager.RemoteStager(self.sftp, str(base), python=kw.pop("python", sys.executable), **kw)


@pytest.fixture
def project(tmp_path):
    d = tmp_path / "project"
    (d / "data").mkdir(parents=True)
    (d / "train.py").write_text("print(open('data/x.txt').read())\n")
    (d / "data" / "x.txt").write_text("original data\n")
    (d / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (d / "run.sh").chmod(0o755)
    return d


def _tree(project: Path) -> manifest.Tree:
    return manifest.code_tree(project, cache=manifest.HashCache(project.parent / "hashes.json"))


def _objects(base: Path) -> dict[str, Path]:
    return {p.name: p for p in (base / "objects").iterdir() if not p.name.startswith(".")}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_runs_get_private_copies_and_objects_are_read_only(tmp_path, project):
    base = tmp_path / "remote" / "cache"
    tree = _tree(project)

    async def go():
        async with _Host(tmp_path) as host:
            first = host.stager(base)
            await first.stage(runs=[(tree, str(tmp_path / "run1" / "code"), "code")])
            # The script of run 1 rewrites its own data file, as scripts do.
            (tmp_path / "run1" / "code" / "data" / "x.txt").write_text("rewritten by run 1\n")
            second = host.stager(base)
            await second.stage(runs=[(tree, str(tmp_path / "run2" / "code"), "code")])
            return first.stats, second.stats

    s1, s2 = asyncio.run(go())
    assert (tmp_path / "run2" / "code" / "data" / "x.txt").read_text() == "original data\n"
    assert s1.uploaded_files == 3 and s2.uploaded_files == 0 and s2.placed == {"code": 3}
    assert s1.verify == s2.verify == "sha256" and s2.copy in ("copy", "reflink", "clonefile")
    objects = _objects(base)
    assert len(objects) == 3
    for name, obj in objects.items():
        st = obj.stat()
        assert stat.S_IMODE(st.st_mode) == (0o555 if name.endswith(".x") else 0o444)
        assert st.st_nlink == 1  # no run holds a link to it
        assert _sha(obj.read_bytes()) == name.removesuffix(".x")
    run2 = tmp_path / "run2" / "code"
    assert os.access(run2 / "data" / "x.txt", os.W_OK) and os.stat(run2 / "run.sh").st_mode & 0o111
    assert not list((base / "objects").glob(".tmp-*"))


def test_a_poisoned_object_is_detected_and_sent_again(tmp_path, project):
    base = tmp_path / "remote" / "cache"
    tree = _tree(project)
    data_sha = _sha(b"original data\n")

    async def go():
        async with _Host(tmp_path) as host:
            await host.stager(base).stage(runs=[(tree, str(tmp_path / "run1"), "code")])
            obj = base / "objects" / data_sha
            obj.chmod(0o644)  # someone forces a write into the cache, same size even
            obj.write_text("poisoned data\n")
            again = host.stager(base)
            await again.stage(runs=[(tree, str(tmp_path / "run2"), "code")])
            return again.stats

    s = asyncio.run(go())
    assert (tmp_path / "run2" / "data" / "x.txt").read_text() == "original data\n"
    assert s.repaired == 1 and s.uploaded_files == 1 and s.uploaded == {"code": 1}
    assert (base / "objects" / data_sha).read_text() == "original data\n"
    assert stat.S_IMODE((base / "objects" / data_sha).stat().st_mode) == 0o444


def test_a_changed_shared_runtime_is_rebuilt(tmp_path):
    base = tmp_path / "remote" / "cache"
    rt = manifest.runtime_tree(manifest.HashCache(tmp_path / "h.json"))

    async def go():
        async with _Host(tmp_path) as host:
            first = host.stager(base)
            root = Path(await first.shared_tree(rt, "runtime"))
            victim = root / "orchestrator" / "protocol.py"
            assert not os.access(victim, os.W_OK) or os.geteuid() == 0
            victim.chmod(0o644)
            victim.write_text(victim.read_text() + "\nraise SystemExit('poisoned')\n")
            second = host.stager(base)
            await second.shared_tree(rt, "runtime")
            third = host.stager(base)
            await third.shared_tree(rt, "runtime")
            return root, first.stats, second.stats, third.stats

    root, s1, s2, s3 = asyncio.run(go())
    assert not s1.runtime_reused and not s2.runtime_reused and s3.runtime_reused
    assert s2.uploaded_files == 0  # the objects were intact: only the shared copy was rebuilt
    assert "poisoned" not in (root / "orchestrator" / "protocol.py").read_text()
    assert (root / "orchestrator" / "protocol.py").read_bytes() == (manifest.PACKAGE_DIR / "protocol.py").read_bytes()


def test_a_damaged_upload_is_refused(tmp_path, project, monkeypatch):
    base = tmp_path / "remote" / "cache"
    tree = _tree(project)
    real_put = stager.RemoteStager._put_tmp

    async def truncating_put(self, f, kind):  # the transfer went wrong on the way
        c = await real_put(self, f, kind)
        Path(c["tmp"]).chmod(0o644)
        Path(c["tmp"]).write_bytes(b"x" * f.size)
        return c

    monkeypatch.setattr(stager.RemoteStager, "_put_tmp", truncating_put)

    async def go():
        async with _Host(tmp_path) as host:
            with pytest.raises(manifest.StagingError) as e:
                await host.stager(base).stage(runs=[(tree, str(tmp_path / "run1"), "code")])
            return str(e.value)

    msg = asyncio.run(go())
    assert "does not match its SHA-256" in msg
    assert not _objects(base)  # nothing damaged was committed


def test_a_file_written_during_the_launch_is_named_as_changed_not_damaged(tmp_path):
    src = tmp_path / "grow.log"
    src.write_bytes(b"x" * 10)
    assert stager._changed_while_staged("grow.log", src, 10, 10) == "the upload of grow.log arrived with 10 bytes where 10 were sent"
    src.write_bytes(b"x" * 25)  # a log line appended after hashing
    assert stager._changed_while_staged("grow.log", src, 10, 25) == (
        "grow.log changed while it was being staged (10 bytes when hashed, 25 now): stop writing it during the "
        "launch, or move it out of the script's folder")


@pytest.mark.parametrize("exc", [BrokenPipeError(32, "Broken pipe"), OSError("Connection not open")])
def test_a_connection_lost_while_staging_is_said_in_words(exc):
    assert stager.describe_sftp_error(exc).startswith("the SSH connection was lost while staging")


def test_without_a_remote_python_staging_still_gives_copies(tmp_path, project):
    """An SFTP-only host (or no python3 on its PATH): weaker checks, but still copies and read-only objects."""
    base = tmp_path / "remote" / "cache"
    tree = _tree(project)
    data_sha = _sha(b"original data\n")

    async def go():
        async with _Host(tmp_path, exec_commands=False) as host:
            first = host.stager(base)
            await first.stage(runs=[(tree, str(tmp_path / "run1"), "code")])
            (tmp_path / "run1" / "data" / "x.txt").write_text("rewritten by run 1\n")
            second = host.stager(base)
            await second.stage(runs=[(tree, str(tmp_path / "run2"), "code")])
            obj = base / "objects" / data_sha
            obj.chmod(0o644)
            obj.write_text("poisoned data\n")  # same size; the write moves its mtime
            third = host.stager(base)
            await third.stage(runs=[(tree, str(tmp_path / "run3"), "code")])
            return first.stats, second.stats, third.stats

    s1, s2, s3 = asyncio.run(go())
    assert s1.verify.startswith("size+mode+mtime over SFTP")
    assert (tmp_path / "run2" / "data" / "x.txt").read_text() == "original data\n"
    assert s2.uploaded_files == 0 and s2.placed == {"code": 3}
    assert (tmp_path / "run3" / "data" / "x.txt").read_text() == "original data\n" and s3.uploaded_files == 1
    for obj in _objects(base).values():
        assert not obj.stat().st_mode & 0o222 and obj.stat().st_nlink == 1


def test_a_missing_interpreter_falls_back_to_sftp(tmp_path, project):
    base = tmp_path / "remote" / "cache"

    async def go():
        async with _Host(tmp_path) as host:
            st = host.stager(base, python="/nonexistent/python3")
            await st.stage(runs=[(_tree(project), str(tmp_path / "run1"), "code")])
            return st.stats

    s = asyncio.run(go())
    assert "/nonexistent/python3 could not run the check" in s.verify
    assert (tmp_path / "run1" / "data" / "x.txt").read_text() == "original data\n"


def test_one_command_per_host_when_nothing_changed(tmp_path, project):
    base = tmp_path / "remote" / "cache"
    tree, rt = _tree(project), manifest.runtime_tree(manifest.HashCache(tmp_path / "h.json"))

    async def go():
        async with _Host(tmp_path) as host:
            await host.stager(base).stage(shared=[(rt, "runtime")], runs=[(tree, str(tmp_path / "r1" / "code"), "code")],
                                          dirs=[str(tmp_path / "r1" / "run")])
            n_first = len(host.commands)
            st = host.stager(base)
            await st.stage(shared=[(rt, "runtime")], runs=[(tree, str(tmp_path / "r2" / "code"), "code")],
                           dirs=[str(tmp_path / "r2" / "run")])
            return n_first, len(host.commands) - n_first, st.stats

    n_first, n_second, s = asyncio.run(go())
    assert n_first == 2 and n_second == 1  # look, upload, commit+place; then just look+place
    assert s.runtime_reused and s.uploaded_files == 0 and s.placed == {"code": 3}
    assert (tmp_path / "r2" / "run").is_dir()


def test_hosts_sharing_a_filesystem_stage_the_same_content_at_once(tmp_path, project):
    """Four hosts on one filesystem (an NFS home): all upload, repair and build together, all end up right."""
    base = tmp_path / "remote" / "cache"
    tree, rt = _tree(project), manifest.runtime_tree(manifest.HashCache(tmp_path / "h.json"))

    async def go():
        async with _Host(tmp_path) as a, _Host(tmp_path) as b:
            hosts = [a, b, a, b]

            async def one(i: int, label: str) -> stager.StageStats:
                st = hosts[i].stager(base)
                await st.stage(shared=[(rt, "runtime")], runs=[(tree, str(tmp_path / label / f"h{i}"), "code")])
                return st.stats

            await asyncio.gather(*(one(i, "first") for i in range(4)))
            root = Path(hosts[0].stager(base).shared_tree_path(rt, "runtime"))
            victim = root / "orchestrator" / "protocol.py"
            victim.chmod(0o644)
            victim.write_text("poisoned\n")
            obj = base / "objects" / _sha(b"original data\n")
            obj.chmod(0o644)
            obj.write_text("poisoned data\n")
            return root, await asyncio.gather(*(one(i, "second") for i in range(4)))

    root, second = asyncio.run(go())
    for i in range(4):
        assert (tmp_path / "second" / f"h{i}" / "data" / "x.txt").read_text() == "original data\n"
    assert (root / "orchestrator" / "protocol.py").read_bytes() == (manifest.PACKAGE_DIR / "protocol.py").read_bytes()
    assert sum(s.repaired for s in second) >= 1
    leftovers = [p.name for p in (base / "runtime").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not list((base / "objects").glob(".*"))


def _run_helper_here(req: dict, capsys) -> dict:
    """HELPER in this process (so a test can force its macOS branch); what it would send back."""
    import json

    exec(stager.HELPER, {"REQ": {"mtime": stager.OBJECT_MTIME, "commit": [], "trees": [], "dirs": [], **req},
                          "__name__": "orch_stage"})
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_on_macos_runs_get_apfs_clones(tmp_path, monkeypatch, capsys):
    import ctypes
    import shutil

    objects = tmp_path / "objects"
    objects.mkdir()
    data = b"weights\n"
    name = _sha(data)
    (objects / name).write_bytes(data)
    calls = []

    class _LibSystem:  # clonefile(2)'s contract: (src, dst, flags) -> 0, dst gets src's content and mode
        def __init__(self, path, use_errno=False):
            assert path == "/usr/lib/libSystem.B.dylib" and use_errno

        def clonefile(self, src, dst, flags):
            calls.append((src, dst, flags))
            shutil.copy2(os.fsdecode(src), os.fsdecode(dst))
            return 0

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ctypes, "CDLL", _LibSystem)
    dst = tmp_path / "run" / "data.bin"
    out = _run_helper_here({"objects": str(objects), "place": [[name, len(data), name, 0o644, [str(dst)]]]}, capsys)
    assert out["method"] == "clonefile" and out["placed"] == 1 and out["missing"] == []
    assert calls == [(os.fsencode(objects / name), os.fsencode(dst), 0)]
    assert dst.read_bytes() == data and stat.S_IMODE(dst.stat().st_mode) == 0o644
    assert stat.S_IMODE((objects / name).stat().st_mode) == 0o444  # the object was sealed on the way


def test_on_macos_without_clones_runs_get_plain_copies(tmp_path, monkeypatch, capsys):
    objects = tmp_path / "objects"
    objects.mkdir()
    data = b"weights\n"
    name = _sha(data)
    (objects / name).write_bytes(data)
    monkeypatch.setattr(sys, "platform", "darwin")  # no libSystem here: the clone attempt fails, a copy is made
    dst = tmp_path / "run" / "data.bin"
    out = _run_helper_here({"objects": str(objects), "place": [[name, len(data), name, 0o644, [str(dst)]]]}, capsys)
    assert out["method"] == "copy" and dst.read_bytes() == data
    assert os.stat(dst).st_ino != os.stat(objects / name).st_ino


def test_the_helper_is_a_stdlib_module_shipped_as_its_own_source(tmp_path, capsys):
    """What the host runs is stage_helper.py itself: importing it does nothing, it needs only the standard
    library (it runs under -S, without orch installed), and ``run`` does in-process what the shipped copy does."""
    import ast
    import importlib

    from orchestrator.remote import stage_helper

    path = Path(stage_helper.__file__)
    assert stager.HELPER == path.read_text()
    imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(stager.HELPER)) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(stager.HELPER))
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    importlib.reload(stage_helper)
    assert capsys.readouterr().out == ""  # imported, not run

    data = b"weights\n"
    name = _sha(data)
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / name).write_bytes(data)
    place = [[name, len(data), name, 0o644, [str(tmp_path / "a" / "w.bin")]], ["0" * 64, 1, "0" * 64, 0o644, []]]
    req = {"objects": str(tmp_path / "objects"), "mtime": stager.OBJECT_MTIME, "commit": [], "trees": [],
           "dirs": [], "place": place}
    assert stage_helper.run(req)["missing"] == ["0" * 64]
    assert (tmp_path / "a" / "w.bin").read_bytes() == data
    (tmp_path / "a" / "w.bin").unlink()
    shipped = _run_helper_here(req, capsys)  # the copy exec'd as on a host answers the same
    assert shipped["missing"] == ["0" * 64] and shipped["placed"] == 1 and shipped["errors"] == []
