"""Ship what the ranks need to every remote host, uploading each file's content once.

What goes where on a host (``BASE`` is ``~/.cache/mlx-orch``)::

    BASE/objects/<sha256>[.x]          every file ever staged, named by its content (``.x``: executable)
    BASE/runtime/<tree digest>/        the rank runtime (orchestrator/__init__.py, protocol.py, runtime/**),
                                       shared by every run of the same orch version: built once, then
                                       found with one ``stat`` (and Python's bytecode cache stays warm)
    BASE/runs/<run-id>-h<i>/code/      the script's directory (+ ``--stage`` paths), hard links into objects/
    BASE/runs/<run-id>-h<i>/run/       the rank's ``ORCH_RUN_DIR`` (checkpoints, stats), collected at the end

``<run-id>`` is the local run directory's name plus a random suffix; ``h<i>``
the host's index in the hostfile, so hosts that share a filesystem (an NFS
home, or the namespace test cluster) get separate run directories. After a
run whose results were collected, the launcher renames ``runs/<run-id>-h<i>``
to ``runs/.trash-<run-id>-h<i>`` (one round trip) and a later run deletes it
in the background; the object and runtime caches stay.

Uploads go through the host's one SFTP session, many requests in flight at
once. An object is uploaded under a temporary name and renamed into place, so
two hosts on one filesystem racing to upload the same content both succeed.
A second run of unchanged code uploads nothing: every ``link`` finds its
object. ``StageStats`` counts what was sent, so tests and users can check.

Local side: a ``Tree`` is a list of files with their SHA-256, built from the
script's directory minus version-control, caches and run outputs.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import posixpath
import secrets
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

PACKAGE_DIR = Path(__file__).resolve().parent  # .../orchestrator

# Directory names never staged (anywhere in the tree) and file suffixes never staged.
IGNORED_DIRS = frozenset({
    ".git", ".hg", ".svn", "runs", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".tox", ".nox", ".venv", "venv", "node_modules", ".ipynb_checkpoints", ".idea", ".vscode",
    ".cache", ".eggs", ".DS_Store",
})
IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", ".egg-info", "~")
IGNORED_NAMES = frozenset({".DS_Store"})

# A script directory larger than this is almost certainly a mistake (a home directory).
MAX_FILES = 20_000
MAX_BYTES = 4 << 30

IN_FLIGHT = 64  # SFTP requests outstanding per host


class StagingError(Exception):
    """Staging could not be done; the message says what and how to fix it."""


@dataclass(frozen=True)
class FileEntry:
    rel: str          # POSIX path inside the tree
    src: str          # local file
    size: int
    sha256: str
    executable: bool

    @property
    def object_name(self) -> str:
        return self.sha256 + (".x" if self.executable else "")


@dataclass
class Tree:
    files: list[FileEntry] = field(default_factory=list)

    @property
    def dirs(self) -> list[str]:
        """Every directory the files need, parents before children."""
        out: set[str] = set()
        for f in self.files:
            d = posixpath.dirname(f.rel)
            while d:
                out.add(d)
                d = posixpath.dirname(d)
        return sorted(out, key=lambda d: (d.count("/"), d))

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.rel):
            h.update(f"{f.rel}\0{f.object_name}\n".encode())
        return h.hexdigest()


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

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- local side


class _HashCache:
    """SHA-256 of local files, remembered by (size, mtime, inode) in ~/.cache/mlx-orch/hashes.json."""

    def __init__(self, path: Optional[Path] = None):
        self.path = path or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-orch" / "hashes.json"
        self._data: Optional[dict] = None
        self._dirty = False

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
                if not isinstance(self._data, dict):
                    self._data = {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def sha256(self, path: str, st: os.stat_result) -> str:
        key = os.path.abspath(path)
        sig = [st.st_size, st.st_mtime_ns, st.st_ino]
        data = self._load()
        hit = data.get(key)
        if isinstance(hit, list) and len(hit) == 2 and hit[0] == sig:
            return hit[1]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        data[key] = [sig, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty or self._data is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._data))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass  # a cache, nothing more


def _ignored(name: str, is_dir: bool) -> bool:
    if is_dir:
        return name in IGNORED_DIRS or name.endswith(".egg-info")
    return name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES)


def _walk(root: Path) -> Iterable[tuple[Path, str]]:
    """(file, relative POSIX path) under root, skipping ignored names; symlinked files are followed, symlinked dirs not."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d, True) and not os.path.islink(os.path.join(dirpath, d)))
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if _ignored(name, False):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            yield Path(dirpath) / name, rel.replace(os.sep, "/")


def _entry(path: Path, rel: str, cache: _HashCache) -> Optional[FileEntry]:
    try:
        st = os.stat(path)
    except OSError:
        return None  # a dangling symlink
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileEntry(rel=rel, src=str(path), size=st.st_size, sha256=cache.sha256(str(path), st),
                     executable=bool(st.st_mode & 0o111))


def runtime_tree(cache: Optional[_HashCache] = None) -> Tree:
    """What a rank imports from orch: the package marker, protocol.py and runtime/ (never the controller)."""
    cache = cache or _HashCache()
    tree = Tree()
    for rel in ("__init__.py", "protocol.py"):
        e = _entry(PACKAGE_DIR / rel, f"orchestrator/{rel}", cache)
        if e is None:
            raise StagingError(f"{PACKAGE_DIR / rel} is missing; reinstall mlx-orch")
        tree.files.append(e)
    for path, rel in _walk(PACKAGE_DIR / "runtime"):
        e = _entry(path, f"orchestrator/runtime/{rel}", cache)
        if e is not None:
            tree.files.append(e)
    cache.save()
    return tree


def code_tree(script_dir: Path, extra: Iterable[str] = (), cache: Optional[_HashCache] = None) -> Tree:
    """The script's directory, plus ``--stage`` paths.

    A staged path inside the script's directory keeps its place; one outside
    lands at the top of the tree under its own name (so ``--stage ../data``
    is ``data/`` next to the script). Ignored names are skipped in both.
    """
    cache = cache or _HashCache()
    script_dir = script_dir.resolve()
    by_rel: dict[str, FileEntry] = {}
    total = 0

    def add(path: Path, rel: str) -> None:
        nonlocal total
        e = _entry(path, rel, cache)
        if e is None:
            return
        by_rel[rel] = e
        total += e.size
        if len(by_rel) > MAX_FILES or total > MAX_BYTES:
            raise StagingError(
                f"{script_dir} holds more than {min(len(by_rel), MAX_FILES):,} files / {total >> 20:,} MiB, "
                "too much to upload for every run: put the script in a directory of its own, or, if the code "
                "is already on every host at the same path, pass --cwd"
            )

    for path, rel in _walk(script_dir):
        add(path, rel)
    for item in extra:
        p = Path(item).expanduser()
        if not p.exists():
            raise StagingError(f"--stage {item}: no such file or directory")
        p = p.resolve()
        try:
            base = p.relative_to(script_dir).as_posix()
        except ValueError:
            base = p.name
        if p.is_dir():
            for path, rel in _walk(p):
                add(path, rel if base in ("", ".") else f"{base}/{rel}")
        else:
            add(p, base)
    cache.save()
    return Tree(files=sorted(by_rel.values(), key=lambda f: f.rel))


# ----------------------------------------------------------------------------- remote side


def _is_missing(exc: BaseException) -> bool:
    import asyncssh

    return isinstance(exc, asyncssh.SFTPNoSuchFile) or (
        isinstance(exc, asyncssh.SFTPFailure) and "no such file" in str(exc).lower()
    )


def _exists_error(exc: BaseException) -> bool:
    import asyncssh

    return isinstance(exc, asyncssh.SFTPFileAlreadyExists) or isinstance(exc, asyncssh.SFTPFailure)


class RemoteStager:
    """Staging on one host through its SFTP session. ``base`` is an absolute remote path."""

    def __init__(self, sftp, base: str, stats: Optional[StageStats] = None):
        self.sftp = sftp
        self.base = base
        self.objects = f"{base}/objects"
        self.stats = stats or StageStats()
        self._sem = asyncio.Semaphore(IN_FLIGHT)
        self._uploads: dict[str, asyncio.Task] = {}
        self._objects_dir: Optional[asyncio.Future] = None

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
        import asyncssh

        try:
            await self.sftp.mkdir(path)
        except asyncssh.SFTPError:
            if not await self.sftp.isdir(path):
                raise

    async def makedirs(self, path: str) -> None:
        """``mkdir -p``: one round trip when the parent exists, the full walk only when it does not."""
        import asyncssh

        try:
            await self.mkdir_ok(path)
        except asyncssh.SFTPError:
            await self.sftp.makedirs(path, exist_ok=True)

    def _count_upload(self, f: FileEntry, kind: str) -> None:
        self.stats.uploaded_files += 1
        self.stats.uploaded_bytes += f.size
        self.stats.uploaded[kind] = self.stats.uploaded.get(kind, 0) + 1

    async def _upload(self, f: FileEntry, kind: str) -> None:
        """Put one object in place (temp name, then an atomic rename)."""
        import asyncssh

        final = f"{self.objects}/{f.object_name}"
        tmp = f"{self.objects}/.tmp-{f.sha256[:16]}-{secrets.token_hex(4)}"
        if self._objects_dir is None:
            self._objects_dir = asyncio.ensure_future(self.makedirs(self.objects))
        await asyncio.shield(self._objects_dir)
        try:
            await self.sftp.put(f.src, tmp)
            await self.sftp.chmod(tmp, 0o755 if f.executable else 0o644)
            try:
                await self.sftp.posix_rename(tmp, final)
            except asyncssh.SFTPOpUnsupported:
                try:
                    await self.sftp.rename(tmp, final)
                except asyncssh.SFTPError:
                    if not await self.sftp.exists(final):
                        raise
        finally:
            try:
                await self.sftp.remove(tmp)
            except asyncssh.SFTPError:
                pass
        self._count_upload(f, kind)

    async def ensure_object(self, f: FileEntry, kind: str = "code") -> None:
        task = self._uploads.get(f.object_name)
        if task is None:
            task = self._uploads[f.object_name] = asyncio.ensure_future(self._upload(f, kind))
        await asyncio.shield(task)

    async def _place(self, f: FileEntry, dest: str, kind: str) -> None:
        """Hard-link the object to ``dest``, uploading it first if the host does not have it."""
        import asyncssh

        obj = f"{self.objects}/{f.object_name}"
        for attempt in range(2):
            try:
                await self.sftp.link(obj, dest)
                break
            except asyncssh.SFTPOpUnsupported:
                # No hard links on this server: copy the content straight into place.
                await self.sftp.put(f.src, dest)
                await self.sftp.chmod(dest, 0o755 if f.executable else 0o644)
                self._count_upload(f, kind)
                break
            except asyncssh.SFTPError as e:
                if attempt == 0:
                    # Usually: the object is not there yet (or another host on this filesystem is just renaming it in).
                    if not await self.sftp.exists(obj):
                        await self.ensure_object(f, kind)
                    continue
                raise StagingError(f"cannot place {f.rel} at {dest}: {e.reason or e}") from None
        self.stats.files += 1
        self.stats.bytes += f.size
        self.stats.placed[kind] = self.stats.placed.get(kind, 0) + 1

    async def materialise(self, tree: Tree, dest: str, kind: str = "code") -> None:
        """Build ``tree`` under ``dest`` (which must exist and be empty)."""
        # Directories level by level (parents first), each level in one batch.
        by_depth: dict[int, list[str]] = {}
        for d in tree.dirs:
            by_depth.setdefault(d.count("/"), []).append(d)
        for depth in sorted(by_depth):
            await self._gather(self.sftp.mkdir(f"{dest}/{d}") for d in by_depth[depth])
        await self._gather(self._place(f, f"{dest}/{f.rel}", kind) for f in tree.files)

    def shared_tree_path(self, tree: Tree, kind: str) -> str:
        return f"{self.base}/{kind}/{tree.digest[:24]}"

    async def shared_tree(self, tree: Tree, kind: str) -> str:
        """A content-addressed tree shared by all runs: ``BASE/<kind>/<digest>``. Built once, atomically."""
        import asyncssh

        final = self.shared_tree_path(tree, kind)
        if await self.sftp.isdir(final):
            self.stats.runtime_reused = True
            return final
        self.stats.runtime_reused = False
        await self.makedirs(f"{self.base}/{kind}")
        tmp = f"{self.base}/{kind}/.tmp-{tree.digest[:12]}-{secrets.token_hex(4)}"
        await self.sftp.mkdir(tmp)
        try:
            await self.materialise(tree, tmp, kind)
            try:
                await self.sftp.posix_rename(tmp, final)
            except asyncssh.SFTPError:
                if not await self.sftp.isdir(final):  # not a lost race: a real failure
                    raise
        finally:
            if await self.sftp.isdir(tmp):
                await self.sftp.rmtree(tmp, ignore_errors=True)
        return final


def describe_sftp_error(exc: BaseException) -> str:
    """One human line for an SFTP / OS failure during staging."""
    import asyncssh

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
    return f"{type(exc).__name__}: {exc}"
