"""Ship what the ranks need to every remote host, uploading each file's content once.

What goes where on a host (``BASE`` is ``~/.cache/mlx-orch``)::

    BASE/objects/<sha256>[.x]          every file ever staged, named by its content (``.x``: executable);
                                       read-only, and hashed again before each reuse
    BASE/runtime/<tree digest>/        the rank runtime (orchestrator/__init__.py, protocol.py, runtime/**),
                                       read-only copies shared by every run of the same orch version: built
                                       once, checked by hash every run, rebuilt if anything in it changed
    BASE/runs/<run-id>-h<i>/code/      the script's directory (+ ``--stage`` paths): the run's own *copies*
    BASE/runs/<run-id>-h<i>/run/       the rank's ``ORCH_RUN_DIR`` (checkpoints, stats), collected at the end

The run directories (``runs/``: run ids, one per hostfile entry, retired to
``runs/.trash-*`` after collection and deleted by a later run) are ``sites.py``'s;
the object and runtime caches stay.

One helper command per host does the checking and placing (``stage_host``), and
it runs in that host's first rank session (``SessionHelper``) before the session
waits for its release: every session pays for a login shell and its rc files.

Why copies and hashes: the objects are shared by every later run. A run that
was given a hard link to one (as staging once did) and rewrote "its" data
file rewrote it for every run after it. Now an object is written under a
temporary name, hashed on the host, made read-only and renamed into place;
on reuse it is hashed again (a mismatch is thrown away and uploaded anew);
and a run gets a copy (a clone on APFS or a reflink-capable Linux
filesystem, so copying costs no space or time there). All of that is one
remote command per host (``HELPER``); a second run of unchanged code uploads
nothing. ``StageStats`` counts what was sent and says how objects were
checked, so tests and users can see it.

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
import shlex
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:
    from orchestrator.remote.sites import HostLink, Site

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../orchestrator

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
    verify: str = ""           # how reused objects were checked: "sha256" (the helper ran), else why not
    copy: str = ""             # how runs got their files: clonefile, reflink, copy (or mixed)
    repaired: int = 0          # damaged objects found and replaced

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- local side


class HashCache:
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


def _entry(path: Path, rel: str, cache: HashCache) -> Optional[FileEntry]:
    try:
        st = os.stat(path)
    except OSError:
        return None  # a dangling symlink
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileEntry(rel=rel, src=str(path), size=st.st_size, sha256=cache.sha256(str(path), st),
                     executable=bool(st.st_mode & 0o111))


def runtime_tree(cache: Optional[HashCache] = None) -> Tree:
    """What a rank imports from orch: the package marker, protocol.py and runtime/ (never the controller)."""
    cache = cache or HashCache()
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


def code_tree(script_dir: Path, extra: Iterable[str] = (), cache: Optional[HashCache] = None) -> Tree:
    """The script's directory, plus ``--stage`` paths.

    A staged path inside the script's directory keeps its place; one outside
    lands at the top of the tree under its own name (so ``--stage ../data``
    is ``data/`` next to the script). Ignored names are skipped in both.
    """
    cache = cache or HashCache()
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
#
# The remote half is one small Python program, ``HELPER``, that each host runs with its
# own interpreter over an SSH exec channel (JSON in on stdin, JSON out on stdout). It
# verifies every object a run needs (size and SHA-256: an object is trusted only after
# it hashed right *this* run), commits fresh uploads (hashed, made read-only, renamed into
# place), and gives the run copies (APFS clonefile on macOS, a reflink on Linux where
# the filesystem has them, else a plain copy), never links: whatever a run does to its
# files stays in that run. An unchanged second run costs one such command per host.
#
# A host that cannot run it (no ``python3`` on the login PATH, an SFTP-only account, no
# session left under MaxSessions) is staged over SFTP alone: objects are trusted only if
# they are still read-only, of the right size and carry the mtime orch gave them
# (``OBJECT_MTIME``; any write changes it), and copies are made server-side (``copy-data``)
# or uploaded. Weaker than hashing, and ``StageStats.verify`` says which one a host got.

OBJECT_MTIME = 1_000_000_000  # every object's mtime (2001-09-09), set when it is committed
HELPER_TIMEOUT_S = 60.0       # for one helper command, plus a second per 50 MB it must hash
HASH_RATE = 50e6

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

HELPER = r'''
import hashlib, json, os, shutil, stat, sys

R = REQ
OBJ = R["objects"]
MARK = R["mtime"]
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
FICLONE = 0x40049409
out = {"missing": [], "bad": [], "placed": 0, "trees": {}, "method": "", "errors": []}
known = {}
clonefile = []


def sha256_of(path, size):
    """(hex digest, lstat) of a regular file of the expected size; (None, lstat or None) otherwise."""
    try:
        st = os.lstat(path)
    except OSError:
        return None, None
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return None, st
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except OSError:
        return None, st
    try:
        h = hashlib.sha256()
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
        return h.hexdigest(), st
    finally:
        os.close(fd)


def rid():
    return os.urandom(4).hex()


def discard(path, st):
    """Move a damaged file away, if it is still the one that was checked (a racing host may have replaced it)."""
    try:
        if os.lstat(path).st_ino == st.st_ino:
            gone = "%s/.bad-%s" % (os.path.dirname(path), rid())
            os.rename(path, gone)
            os.unlink(gone)
    except OSError:
        pass


def seal(path, name, st):
    mode = 0o555 if name.endswith(".x") else 0o444
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    if int(st.st_mtime) != MARK:
        os.utime(path, (MARK, MARK))


def have(name, size, sha):
    """The object is there and hashes right (checked once per command); a damaged one is removed."""
    if name not in known:
        path = OBJ + "/" + name
        digest, st = sha256_of(path, size)
        known[name] = digest == sha
        if known[name]:
            seal(path, name, st)
        elif st is not None:
            discard(path, st)
            out["bad"].append(name)
    return known[name]


def commit(c):
    digest, st = sha256_of(c["tmp"], c["size"])
    if st is None:
        return  # already committed by another staging call on this host
    if digest != c["sha"]:
        discard(c["tmp"], st)
        out["errors"].append("the upload of %s arrived damaged" % c["rel"])
        return
    seal(c["tmp"], c["name"], st)
    os.replace(c["tmp"], OBJ + "/" + c["name"])
    known[c["name"]] = True


def copy(src, dst, mode):
    """A private copy of src at dst: a clone where the filesystem can, else the bytes."""
    if sys.platform == "darwin":
        try:
            if not clonefile:
                import ctypes
                clonefile.append(ctypes.CDLL("/usr/lib/libSystem.B.dylib", use_errno=True).clonefile)
            if clonefile[0](os.fsencode(src), os.fsencode(dst), 0) == 0:
                os.chmod(dst, mode)
                return "clonefile"
        except (OSError, AttributeError):
            pass
    how = "copy"
    fi = os.open(src, os.O_RDONLY | NOFOLLOW)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
        try:
            if sys.platform.startswith("linux"):
                try:
                    import fcntl
                    fcntl.ioctl(fo, FICLONE, fi)
                    how = "reflink"
                except (OSError, ImportError):
                    pass
            if how == "copy":
                while True:
                    b = os.read(fi, 1 << 20)
                    if not b:
                        break
                    while b:
                        b = b[os.write(fo, b):]
            os.fchmod(fo, mode)
        finally:
            os.close(fo)
    finally:
        os.close(fi)
    return how


def place(src, dst, mode):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    how = copy(src, dst, mode)
    if out["method"] not in ("", how):
        how = "mixed"
    out["method"] = how


def tree_intact(t):
    """(intact?, lstat of the tree's root or None)."""
    root = t["path"]
    try:
        st = os.lstat(root)
    except OSError:
        return False, None
    if not stat.S_ISDIR(st.st_mode):
        return False, st
    return all(sha256_of(root + "/" + rel, size)[0] == sha for rel, name, size, sha, mode in t["files"]), st


def build_tree(t, damaged):
    root = t["path"]
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = "%s/.tmp-%s" % (parent, rid())
    os.mkdir(tmp)
    try:
        for rel, name, size, sha, mode in t["files"]:
            place(OBJ + "/" + name, tmp + "/" + rel, mode)
        if damaged is not None:  # out of the way first, unless a host on this filesystem replaced it meanwhile
            try:
                if os.lstat(root).st_ino == damaged.st_ino:
                    old = "%s/.trash-%s" % (parent, rid())
                    os.rename(root, old)
                    if os.path.isdir(old) and not os.path.islink(old):
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        os.unlink(old)
            except OSError:
                pass
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isdir(root):
                raise  # else another host on this filesystem built it a moment ago
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    os.makedirs(OBJ, exist_ok=True)
    for c in R["commit"]:
        commit(c)
    for t in R["trees"]:
        intact, st = tree_intact(t)
        if intact:
            out["trees"][t["path"]] = "reused"
            continue
        lacking = [name for rel, name, size, sha, mode in t["files"] if not have(name, size, sha)]
        if lacking:
            out["missing"].extend(lacking)
            out["trees"][t["path"]] = "pending"
        else:
            build_tree(t, st)
            out["trees"][t["path"]] = "built"
    for d in R["dirs"]:
        os.makedirs(d, exist_ok=True)
    for name, size, sha, mode, dests in R["place"]:
        if not have(name, size, sha):
            out["missing"].append(name)
            continue
        for dst in dests:
            place(OBJ + "/" + name, dst, mode)
            out["placed"] += 1


try:
    main()
except OSError as e:
    out["errors"].append("%s: %s" % (e.filename or OBJ, e.strerror or e))
out["missing"] = sorted(set(out["missing"]))
sys.stdout.write("\n" + json.dumps(out) + "\n")
'''


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
        import asyncssh

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
        import asyncssh

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
        import asyncssh

        if await self._object_intact(f):
            return
        await self.makedirs(self.objects)
        final = f"{self.objects}/{f.object_name}"
        tmp = f"{self.objects}/.tmp-{f.sha256[:16]}-{secrets.token_hex(4)}"
        try:
            await self.sftp.put(f.src, tmp)
            a = await self.sftp.stat(tmp)
            if a.size != f.size:
                raise StagingError(f"the upload of {f.rel} arrived with {a.size} of {f.size} bytes")
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
        import asyncssh

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
        import asyncssh

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
        import asyncssh

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


class SessionHelper:
    """The helper in a session opened for something else: a host's first rank session
    (launch/ssh.py's ``rank_command(helper_python=...)``) runs it before it waits for its release.

    ``run`` is the stager's ``first_helper``: the framed request on the session's stdin, the helper's
    result line from its stdout (nothing else is written there before the release). ``failed``: the
    session cannot be released (the helper did not answer); the launcher opens a plain one instead.
    """

    def __init__(self, proc):
        self.proc = proc
        self.failed = False

    async def run(self, framed: bytes, timeout: float) -> str:
        import asyncssh

        try:
            self.proc.stdin.write(framed)
            return await asyncio.wait_for(self._result(), timeout)
        except asyncio.TimeoutError:
            self.failed = True
            raise
        except (asyncssh.Error, OSError, HelperUnavailable) as e:
            self.failed = True
            raise HelperUnavailable(f"the first rank session could not run the check: {e}") from None

    async def _result(self) -> str:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise HelperUnavailable("its session ended")
            text = line.decode(errors="replace").strip()
            if text.startswith("{") and '"missing"' in text:  # the helper's one result line; rc-file noise is skipped
                return text


# ----------------------------------------------------------------------------- one run's staging on one host
#
# The launcher's pipeline per host: connect (``ssh.py``), ``open_host``, then ``stage_host``
# while the ranks' login shells start. Paths come from ``sites.py``.


def local_trees(script_dir: Path, need_code: bool, extra: Iterable[str] = ()) -> tuple[Tree, Optional[Tree]]:
    """The runtime tree and (when a site runs the script from its staged copy) the script directory's tree."""
    cache = HashCache()
    rt = runtime_tree(cache)
    code = code_tree(script_dir, extra, cache) if need_code else None
    return rt, code


@dataclass
class SiteInputs:
    """What one site gets besides the code: the per-job files its ranks' environment names
    (``{remote name: local path}``, e.g. MLX_IBV_DEVICES), and on a restart the latest local
    checkpoint (rank 0's site) and the --resume-arg file (every site)."""

    files: dict[str, str] = field(default_factory=dict)
    checkpoint: Optional[tuple[Path, Path]] = None  # (directory, latest.json): sites.latest_checkpoint
    resume_file: Optional[str] = None


async def open_host(link: "HostLink", runtime_tree: Tree, sites: Sequence["Site"], run_id: str,
                    python: str = "python3") -> None:
    """The host's SFTP session and every remote path of this run there (nothing is created yet).

    ``python``: the interpreter the host's ranks use, which also runs the staging helper. Not
    ``python3`` from the login PATH when the ranks have their own: a pyenv shim alone costs
    ~0.1 s per call (a bash script that execs ``pyenv exec``).
    """
    from orchestrator.remote import sites as layout

    link.sftp = await link.ssh.conn.start_sftp_client()
    link.home = await link.sftp.realpath(".")
    link.stager = RemoteStager(link.sftp, link.base, link.stats, python=python)
    link.runtime_dir = link.stager.shared_tree_path(runtime_tree, "runtime")
    for site in sites:
        layout.place(site, run_id)


async def stage_host(link: "HostLink", sites: Sequence["Site"], runtime_tree: Tree, code_tree: Optional[Tree],
                     inputs: dict[int, SiteInputs]) -> None:
    """Everything this run needs on one host: the shared runtime, and per site its directories, code and inputs.

    One helper command for all of it (the runtime checked or built, every site's directories made and
    code placed): each remote command pays for a session, the login shell's rc files and a Python
    start. Then the per-site inputs over SFTP, all at once.
    """
    import time

    t0 = time.monotonic()
    runs = [(code_tree, s.code_dir, "code") for s in sites if s.code_dir and code_tree is not None]
    dirs = [d for s in sites for d in (s.run_dir, s.code_dir) if d]
    await link.stager.stage(shared=[(runtime_tree, "runtime")], runs=runs, dirs=dirs)

    async def site_inputs(site: "Site") -> None:
        got = inputs.get(site.index) or SiteInputs()
        await asyncio.gather(_put_files(link, site, got.files),
                             *([_put_checkpoint(link, site, *got.checkpoint)] if got.checkpoint is not None else []),
                             *([_put_resume_file(link, site, got.resume_file)] if got.resume_file else []))

    await asyncio.gather(*(site_inputs(s) for s in sites))
    link.stats.seconds = round(time.monotonic() - t0, 4)


async def _put(link: "HostLink", local: str, remote: str) -> None:
    await link.sftp.put(local, remote)
    link.stats.uploaded_files += 1
    link.stats.uploaded_bytes += os.path.getsize(local)


async def _put_files(link: "HostLink", site: "Site", files: dict[str, str]) -> None:
    """Per-job inputs into the site's run root, beside ``run/``: collection never brings them back,
    and retiring the run root removes them with the rest."""
    for name, local in sorted(files.items()):
        await _put(link, local, f"{site.run_root}/{name}")


async def _put_checkpoint(link: "HostLink", site: "Site", src: Path, manifest: Path) -> None:
    """A restarted attempt resumes from the checkpoint the last one brought home; rank 0 shares it at start."""
    dst = f"{site.run_dir}/checkpoints"
    await link.sftp.mkdir(dst)
    await link.sftp.put(str(src), f"{dst}/{src.name}", recurse=True)
    await link.sftp.put(str(manifest), f"{dst}/latest.json")
    link.stats.uploaded_files += sum(1 for p in src.iterdir() if p.is_file()) + 1


async def _put_resume_file(link: "HostLink", site: "Site", local: str) -> None:
    """Every site gets the file the restarted attempt resumes from (every rank may load it, as mlx-lm loads
    an adapter file), beside ``run/`` so collection does not bring it back."""
    from orchestrator.remote.sites import resume_path

    remote = resume_path(site, local)
    await link.sftp.mkdir(remote.rpartition("/")[0])
    await _put(link, local, remote)
