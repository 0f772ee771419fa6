"""What gets staged, seen from the controller: a manifest of files with their path, size, mode and SHA-256.

A ``Tree`` is a list of files with their SHA-256 (``FileEntry``; its ``object_name`` is the
name it has in a host's content-addressed object store, ``stager.py``), built from the
rank runtime (``runtime_tree``: what a rank imports from orch) or from the script's
directory plus ``--stage`` paths (``code_tree``), minus version control, caches and run
outputs. ``HashCache`` remembers each local file's digest by (size, mtime, inode), so an
unchanged tree is not read again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

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
    for sub in ("runtime", "integrations"):  # integrations/: rank-side code for programs not ours (mlx-lm)
        for path, rel in _walk(PACKAGE_DIR / sub):
            e = _entry(path, f"orchestrator/{sub}/{rel}", cache)
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




def local_trees(script_dir: Path, need_code: bool, extra: Iterable[str] = ()) -> tuple[Tree, Optional[Tree]]:
    """The runtime tree and (when a site runs the script from its staged copy) the script directory's tree."""
    cache = HashCache()
    rt = runtime_tree(cache)
    code = code_tree(script_dir, extra, cache) if need_code else None
    return rt, code
