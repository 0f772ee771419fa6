"""Staging on one host: a content-addressed object store, checked by hash, and the run's own copies.

What it keeps on a host (``BASE`` is ``~/.cache/mlx-orch``)::

    BASE/objects/<sha256>[.x]          every file ever staged, named by its content (``.x``: executable);
                                       read-only, and hashed again before each reuse
    BASE/runtime/<tree digest>/        the rank runtime (orchestrator/__init__.py, protocol.py, runtime/**),
                                       read-only copies shared by every run of the same orch version: built
                                       once, checked by hash every run, rebuilt if anything in it changed

Why copies and hashes: the objects are shared by every later run. A run that
was given a hard link to one (as staging once did) and rewrote "its" data
file rewrote it for every run after it. Now an object is written under a
temporary name, hashed on the host, made read-only and renamed into place;
on reuse it is hashed again (a mismatch is thrown away and uploaded anew);
and a run gets a copy (a clone on APFS or a reflink-capable Linux
filesystem, so copying costs no space or time there). All of that is one
remote command per host (``HELPER``, the source of ``stage_helper.py``); a
second run of unchanged code uploads nothing. ``StageStats`` counts what was
sent and says how objects were checked, so tests and users can see it.

A host that cannot run the helper (no ``python3`` on the login PATH, an SFTP-only
account, no session left under MaxSessions) is staged over SFTP alone: objects are
trusted only if they are still read-only, of the right size and carry the mtime orch
gave them (``OBJECT_MTIME``; any write changes it), and copies are made server-side
(``copy-data``) or uploaded. Weaker than hashing, and ``StageStats.verify`` says which
one a host got.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from orchestrator.remote.manifest import FileEntry, StagingError, Tree

IN_FLIGHT = 64  # SFTP requests outstanding per host
OBJECT_MTIME = 1_000_000_000  # every object's mtime (2001-09-09), set when it is committed
HELPER_TIMEOUT_S = 60.0       # for one helper command, plus a second per 50 MB it must hash
HASH_RATE = 50e6

# What the host runs: a real module, sent as source and exec'd there (its docstring says why).
HELPER = (Path(__file__).resolve().parent / "stage_helper.py").read_text()

# Run as ``python3 -c BOOT``: no backslash or single quote, so any login shell passes it through intact.
HELPER_BOOT = 'import json,sys;d=json.load(sys.stdin);exec(d["src"],{"REQ":d["req"],"__name__":"orch_stage"})'
# The same in a session that goes on after it (a host's first rank session, launch/ssh.py: one login
# shell per host less): a line with the payload's length, then exactly that many bytes, nothing more
# read, so the line that follows (the release) stays for the shell.
HELPER_BOOT_FRAMED = ('import json,sys;b=sys.stdin.buffer;d=json.loads(b.read(int(b.readline())));'
                      'exec(d["src"],{"REQ":d["req"],"__name__":"orch_stage"})')


def helper_command(python: str) -> str:
    """The shell line that runs the staging helper framed (``HELPER_BOOT_FRAMED``); -S: it needs only the
    standard library, not site's .pth hooks."""
    return shlex.join([python, "-S", "-c", HELPER_BOOT_FRAMED])


def helper_frame(payload: bytes) -> bytes:
    return b"%d\n" % len(payload) + payload


@dataclass
class StageStats:
    """What staging did on one host."""

    files: int = 0             # files placed into the run (links made)
    bytes: int = 0             # their total size
    uploaded_files: int = 0    # objects actually sent
    uploaded_bytes: int = 0
    placed: dict = field(default_factory=dict)    # tree ("runtime", "code") -> files placed
    uploaded: dict = field(default_factory=dict)  # tree -> objects sent for it
    runtime_reused: bool = False
    seconds: float = 0.0
    verify: str = ""           # how reused objects were checked: "sha256" (the helper ran), else why not
    copy: str = ""             # how runs got their files: clonefile, reflink, copy (or mixed)
    repaired: int = 0          # damaged objects found and replaced

    def as_dict(self) -> dict:
        return asdict(self)


class HelperUnavailable(Exception):
    """The host could not run ``HELPER``: stage it over SFTP alone."""


def _connection_of(sftp):
    """The SSH connection an SFTP client runs on (asyncssh keeps it on the channel), or None."""
    try:
        return sftp._handler._writer.get_extra_info("connection")
    except AttributeError:
        return None


def _shared_mode(f: FileEntry) -> int:
    return 0o555 if f.executable else 0o444   # shared trees are read-only, like the objects


def _run_mode(f: FileEntry) -> int:
    return 0o755 if f.executable else 0o644   # a run's own copy is its to change


class RemoteStager:
    """Staging on one host. ``base`` is an absolute remote path; ``conn`` (default: the SFTP
    session's connection) runs ``HELPER`` with ``python`` (default ``python3`` from the login PATH)."""

    def __init__(self, sftp, base: str, stats: Optional[StageStats] = None, *, conn=None, python: str = "python3"):
        self.sftp = sftp
        self.base = base
        self.objects = f"{base}/objects"
        self.stats = stats or StageStats()
        self.conn = conn if conn is not None else _connection_of(sftp)
        self.python = python
        self._sem = asyncio.Semaphore(IN_FLIGHT)
        self._uploads: dict[str, asyncio.Future] = {}
        self._helper_lock = asyncio.Lock()  # one helper channel at a time: ranks' sessions count against MaxSessions
        self._sftp_only: Optional[str] = None if self.conn is not None else "no SSH connection to run a command on"
        # Set by the launcher: runs the first helper call in a session it opened anyway (``helper_frame``'d
        # payload and a timeout in, the helper's stdout out; ``HelperUnavailable``: use a session of its own).
        self.first_helper = None

    async def _gather(self, coros) -> None:
        async def one(c):
            async with self._sem:
                return await c

        results = await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def mkdir_ok(self, path: str) -> None:
        """``mkdir`` that accepts an existing directory (another host on the same filesystem may have made it)."""
        from orchestrator.remote.ssh import asyncssh

        try:
            await self.sftp.mkdir(path)
        except asyncssh.SFTPError:
            if not await self.sftp.isdir(path):
                raise

    async def makedirs(self, path: str) -> None:
        """``mkdir -p``: one round trip when the parent exists, the full walk only when it does not."""
        from orchestrator.remote.ssh import asyncssh

        try:
            await self.mkdir_ok(path)
        except asyncssh.SFTPError:
            await self.sftp.makedirs(path, exist_ok=True)

    def shared_tree_path(self, tree: Tree, kind: str) -> str:
        return f"{self.base}/{kind}/{tree.digest[:24]}"

    # -- the entry points -------------------------------------------------------

    async def stage(self, shared: Sequence[tuple[Tree, str]] = (), runs: Sequence[tuple[Tree, str, str]] = (),
                    dirs: Sequence[str] = ()) -> None:
        """All one host needs in one remote command (two when something must be uploaded first).

        ``shared``: (tree, kind) built once at ``shared_tree_path`` and reused while intact;
        ``runs``: (tree, dest, kind) copied into a run's own directory; ``dirs`` made first.
        """
        if self._sftp_only is None:
            try:
                await self._stage_with_helper(shared, runs, dirs)
                return
            except HelperUnavailable as e:
                self._sftp_only = self._sftp_only or str(e)
        self.stats.verify = f"size+mode+mtime over SFTP ({self._sftp_only})"
        for d in dirs:
            await self.makedirs(d)
        await asyncio.gather(*(self._shared_tree_sftp(t, k) for t, k in shared),
                             *(self._materialise_sftp(t, d, k) for t, d, k in runs))

    async def materialise(self, tree: Tree, dest: str, kind: str = "code") -> None:
        """Copy ``tree`` into ``dest`` (a run's own, empty directory)."""
        await self.stage(runs=[(tree, dest, kind)])

    async def shared_tree(self, tree: Tree, kind: str) -> str:
        """A tree shared by all runs: ``BASE/<kind>/<digest>``, read-only, rebuilt when it is not intact."""
        await self.stage(shared=[(tree, kind)])
        return self.shared_tree_path(tree, kind)

    # -- with the helper ----------------------------------------------------------

    async def _helper(self, req: dict, hash_bytes: int) -> dict:
        from orchestrator.remote.ssh import asyncssh

        timeout = HELPER_TIMEOUT_S + hash_bytes / HASH_RATE
        payload = json.dumps({"src": HELPER, "req": {"objects": self.objects, "mtime": OBJECT_MTIME, **req}})
        async with self._helper_lock:
            if self._sftp_only is not None:  # a call that waited here learns what the one before it found
                raise HelperUnavailable(self._sftp_only)
            first, self.first_helper = self.first_helper, None
            if first is not None:
                try:
                    return self._helper_result(await first(helper_frame(payload.encode()), timeout), "", "")
                except HelperUnavailable:
                    pass  # that session could not run it: one of its own
                except asyncio.TimeoutError:
                    raise StagingError(f"checking the staged files took more than {timeout:.0f}s") from None
            try:
                # -S: the helper needs only the standard library, not site's .pth hooks.
                r = await self.conn.run(shlex.join([self.python, "-S", "-c", HELPER_BOOT]), input=payload,
                                        timeout=timeout, check=False)
            except asyncssh.ChannelOpenError as e:
                raise HelperUnavailable(f"no session for the check: {e.reason}") from None
            except asyncssh.TimeoutError:
                raise StagingError(f"checking the staged files took more than {timeout:.0f}s") from None
        return self._helper_result(str(r.stdout or ""), str(r.stderr or ""), f"exit status {r.exit_status}")

    def _helper_result(self, stdout: str, stderr: str, status: str) -> dict:
        lines = [ln for ln in stdout.splitlines() if ln.strip()]
        try:
            res = json.loads(lines[-1])
            if not isinstance(res, dict) or not isinstance(res.get("missing"), list):
                raise ValueError
        except (ValueError, IndexError):
            why = (stderr.strip().splitlines() or [status])[-1]
            raise HelperUnavailable(f"{self.python} could not run the check: {why[:200]}") from None
        if res.get("errors"):
            raise StagingError("; ".join(map(str, res["errors"]))[:500])
        return res

    async def _stage_with_helper(self, shared, runs, dirs) -> None:
        entries: dict[str, tuple[FileEntry, str]] = {}  # object name -> a file with that content, and its kind
        trees = []
        for tree, kind in shared:
            trees.append({"path": self.shared_tree_path(tree, kind), "kind": kind,
                          "files": [[f.rel, f.object_name, f.size, f.sha256, _shared_mode(f)] for f in tree.files]})
            for f in tree.files:
                entries.setdefault(f.object_name, (f, kind))
        places: dict[str, list] = {}
        for tree, dest, kind in runs:
            for f in tree.files:
                places.setdefault(f.object_name, [f.object_name, f.size, f.sha256, _run_mode(f), []])[4].append(f"{dest}/{f.rel}")
                entries.setdefault(f.object_name, (f, kind))
        hash_bytes = sum(f.size for f, _ in entries.values()) * 2
        first = await self._helper({"commit": [], "trees": trees, "place": list(places.values()), "dirs": list(dirs)},
                                   hash_bytes)
        self.stats.verify = "sha256"
        self.stats.repaired += len(first.get("bad", []))
        status = first.get("trees", {})
        if shared:
            self.stats.runtime_reused = all(status.get(t["path"]) == "reused" for t in trees)
        methods = {first.get("method")}
        missing = [n for n in first["missing"] if n in entries]
        if missing:
            commits = await asyncio.gather(*(self._upload_tmp(*entries[n]) for n in missing))
            again = await self._helper({
                "commit": list(commits),
                "trees": [t for t in trees if status.get(t["path"]) == "pending"],
                "place": [places[n] for n in missing if n in places],
                "dirs": [],
            }, hash_bytes)
            for n in missing:
                self._uploads.pop(n, None)
            if again["missing"]:
                raise StagingError(f"{len(again['missing'])} uploaded file(s) vanished from {self.objects} while staging "
                                   "(is something else cleaning that directory?)")
            methods.add(again.get("method"))
        methods.discard("")
        methods.discard(None)
        if methods:
            self.stats.copy = "mixed" if len(methods) > 1 else methods.pop()
        for tree, _, kind in runs:
            self._count_placed(tree, kind)

    async def _upload_tmp(self, f: FileEntry, kind: str) -> dict:
        """Send ``f`` under a temporary name in objects/ (once per host, whoever asks); the helper commits it."""
        fut = self._uploads.get(f.object_name)
        if fut is None:
            fut = self._uploads[f.object_name] = asyncio.ensure_future(self._put_tmp(f, kind))
        return await asyncio.shield(fut)

    async def _put_tmp(self, f: FileEntry, kind: str) -> dict:
        tmp = f"{self.objects}/.tmp-{f.sha256[:16]}-{secrets.token_hex(4)}"
        async with self._sem:
            await self.sftp.put(f.src, tmp)
        self._count_upload(f, kind)
        return {"name": f.object_name, "tmp": tmp, "size": f.size, "sha": f.sha256, "rel": f.rel}

    def _count_upload(self, f: FileEntry, kind: str) -> None:
        self.stats.uploaded_files += 1
        self.stats.uploaded_bytes += f.size
        self.stats.uploaded[kind] = self.stats.uploaded.get(kind, 0) + 1

    def _count_placed(self, tree: Tree, kind: str) -> None:
        self.stats.files += len(tree.files)
        self.stats.bytes += tree.total_bytes
        self.stats.placed[kind] = self.stats.placed.get(kind, 0) + len(tree.files)

    # -- SFTP alone -------------------------------------------------------------

    async def _object_intact(self, f: FileEntry) -> bool:
        from orchestrator.remote.ssh import asyncssh

        try:
            a = await self.sftp.lstat(f"{self.objects}/{f.object_name}")
        except asyncssh.SFTPError:
            return False
        return (a.type == asyncssh.FILEXFER_TYPE_REGULAR and a.size == f.size and a.permissions is not None
                and not a.permissions & 0o222 and int(a.mtime or 0) == OBJECT_MTIME)

    async def _ensure_object_sftp(self, f: FileEntry, kind: str) -> None:
        fut = self._uploads.get(f.object_name)
        if fut is None:
            fut = self._uploads[f.object_name] = asyncio.ensure_future(self._commit_sftp(f, kind))
        await asyncio.shield(fut)

    async def _commit_sftp(self, f: FileEntry, kind: str) -> None:
        from orchestrator.remote.ssh import asyncssh

        if await self._object_intact(f):
            return
        await self.makedirs(self.objects)
        final = f"{self.objects}/{f.object_name}"
        tmp = f"{self.objects}/.tmp-{f.sha256[:16]}-{secrets.token_hex(4)}"
        try:
            await self.sftp.put(f.src, tmp)
            a = await self.sftp.stat(tmp)
            if a.size != f.size:
                raise StagingError(_changed_while_staged(f.rel, f.src, f.size, a.size))
            await self.sftp.chmod(tmp, _shared_mode(f))
            await self.sftp.utime(tmp, (OBJECT_MTIME, OBJECT_MTIME))
            try:
                await self.sftp.posix_rename(tmp, final)
            except asyncssh.SFTPOpUnsupported:
                await self.sftp.remove(final) if await self.sftp.exists(final) else None
                await self.sftp.rename(tmp, final)
        finally:
            try:
                await self.sftp.remove(tmp)
            except asyncssh.SFTPError:
                pass
        self._count_upload(f, kind)

    async def _copy_sftp(self, f: FileEntry, dest: str, mode: int, kind: str) -> None:
        """A copy of the object at ``dest``, made by the server (``copy-data``) or, failing that, uploaded."""
        from orchestrator.remote.ssh import asyncssh

        await self._ensure_object_sftp(f, kind)
        try:
            await self.sftp.copy(f"{self.objects}/{f.object_name}", dest, remote_only=True)
        except asyncssh.SFTPOpUnsupported:
            await self.sftp.put(f.src, dest)
            self._count_upload(f, kind)
        await self.sftp.chmod(dest, mode)

    async def _fill_sftp(self, tree: Tree, dest: str, kind: str, mode_of) -> None:
        by_depth: dict[int, list[str]] = {}
        for d in tree.dirs:
            by_depth.setdefault(d.count("/"), []).append(d)
        for depth in sorted(by_depth):
            await self._gather(self.mkdir_ok(f"{dest}/{d}") for d in by_depth[depth])
        await self._gather(self._copy_sftp(f, f"{dest}/{f.rel}", mode_of(f), kind) for f in tree.files)

    async def _materialise_sftp(self, tree: Tree, dest: str, kind: str) -> None:
        await self.makedirs(dest)
        await self._fill_sftp(tree, dest, kind, _run_mode)
        self._count_placed(tree, kind)

    async def _tree_intact_sftp(self, tree: Tree, root: str) -> bool:
        from orchestrator.remote.ssh import asyncssh

        if not await self.sftp.isdir(root):
            return False

        async def ok(f: FileEntry) -> bool:
            try:
                a = await self.sftp.lstat(f"{root}/{f.rel}")
            except asyncssh.SFTPError:
                return False
            return (a.type == asyncssh.FILEXFER_TYPE_REGULAR and a.size == f.size and a.permissions is not None
                    and not a.permissions & 0o222)

        return all(await asyncio.gather(*(ok(f) for f in tree.files)))

    async def _shared_tree_sftp(self, tree: Tree, kind: str) -> None:
        from orchestrator.remote.ssh import asyncssh

        final = self.shared_tree_path(tree, kind)
        if await self._tree_intact_sftp(tree, final):
            self.stats.runtime_reused = True
            return
        self.stats.runtime_reused = False
        await self.makedirs(f"{self.base}/{kind}")
        tmp = f"{self.base}/{kind}/.tmp-{tree.digest[:12]}-{secrets.token_hex(4)}"
        await self.sftp.mkdir(tmp)
        try:
            await self._fill_sftp(tree, tmp, kind, _shared_mode)
            if await self.sftp.exists(final):  # there but damaged
                old = f"{self.base}/{kind}/.trash-{secrets.token_hex(4)}"
                await self.sftp.rename(final, old)
                await self.sftp.rmtree(old, ignore_errors=True)
            try:
                await self.sftp.posix_rename(tmp, final)
            except asyncssh.SFTPError:
                if not await self.sftp.isdir(final):  # not a lost race: a real failure
                    raise
        finally:
            if await self.sftp.isdir(tmp):
                await self.sftp.rmtree(tmp, ignore_errors=True)


def describe_sftp_error(exc: BaseException) -> str:
    """One human line for an SFTP / OS failure during staging."""
    from orchestrator.remote.ssh import asyncssh

    if isinstance(exc, StagingError):
        return str(exc)
    if isinstance(exc, asyncssh.SFTPError):
        reason = exc.reason or type(exc).__name__
        if "quota" in reason.lower() or "space" in reason.lower():
            return f"the remote disk is full ({reason})"
        if isinstance(exc, asyncssh.SFTPPermissionDenied):
            return f"permission denied on the remote side ({reason})"
        return reason
    if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
        return f"local file vanished while staging: {exc.filename}"
    lost = (BrokenPipeError, ConnectionError, asyncssh.ConnectionLost, asyncssh.DisconnectError)
    if isinstance(exc, lost) or "connection not open" in str(exc).lower() or "connection lost" in str(exc).lower():
        return f"the SSH connection was lost while staging ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


def _changed_while_staged(rel: str, src, hashed_size: int, arrived: int) -> str:
    """An upload whose size is not the hashed one: nearly always a file written to during the launch (a log in
    the script's folder), not the network."""
    try:
        now = os.stat(src).st_size
    except OSError:
        now = None
    if now is not None and now != hashed_size:
        return (f"{rel} changed while it was being staged ({hashed_size} bytes when hashed, {now} now): stop "
                "writing it during the launch, or move it out of the script's folder")
    return f"the upload of {rel} arrived with {arrived} bytes where {hashed_size} were sent"


