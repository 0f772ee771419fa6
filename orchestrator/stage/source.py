"""What ``orch stage`` sends: the source's files, their sizes, modes and SHA-256.

A folder's files (symlinks to files followed: a Hugging Face snapshot is made of them; symlinks
to folders are not, so a loop cannot make the walk endless), or one file. Digests come from
``remote.manifest.HashCache`` (remembered by size, mtime and inode), so staging the same
model again does not read it again on the controller.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from orchestrator.remote.manifest import HashCache


class SourceError(Exception):
    """The source cannot be staged as given: one line for the user."""


@dataclass(frozen=True)
class SourceFile:
    rel: str     # POSIX path under DEST
    path: str    # local file
    size: int
    sha: Optional[str]   # None until ``hash_source``
    mode: int    # 0o644 or 0o755 on the hosts

    def spec(self) -> dict:
        return {"rel": self.rel, "size": self.size, "mode": self.mode}


@dataclass(frozen=True)
class Source:
    root: str
    files: list[SourceFile]
    dirs: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _file(path: str, rel: str) -> SourceFile:
    st = os.stat(path)
    mode = 0o755 if st.st_mode & 0o111 else 0o644
    return SourceFile(rel=rel, path=path, size=st.st_size, sha=None, mode=mode)


def hash_source(source: Source, cache: Optional[HashCache] = None) -> Source:
    """The same files with their SHA-256 (read only where the cache does not know them: a thread's work)."""
    cache = cache or HashCache()
    try:
        files = []
        for f in source.files:
            try:
                st = os.stat(f.path)
            except OSError as e:
                raise SourceError(f"SRC: {f.path} vanished while orch stage read it ({e.strerror or e})") from None
            if st.st_size != f.size:
                raise SourceError(f"SRC: {f.path} changed size while orch stage read it; stage it when it is complete")
            files.append(replace(f, sha=cache.sha256(f.path, st)))
    finally:
        cache.save()
    return replace(source, files=files)


def read_source(src: str, cache: Optional[HashCache] = None) -> Source:
    """The files of ``src`` with their digests."""
    return hash_source(walk_source(src), cache)


def walk_source(src: str) -> Source:
    """The files of ``src`` (a file: itself, under its own name; a folder: everything in it), not yet hashed."""
    p = Path(src).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise SourceError(f"SRC {src!r}: no such file or folder (give the model folder or file to stage)") from None
    except OSError as e:
        raise SourceError(f"SRC {src!r}: {e.strerror or e}") from None
    files: list[SourceFile] = []
    dirs: list[str] = []
    try:
        if stat.S_ISREG(st.st_mode):
            files.append(_file(str(p), p.name))
        elif stat.S_ISDIR(st.st_mode):
            root = str(p)
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                base = os.path.relpath(dirpath, root)
                for d in dirnames:
                    rel = d if base == "." else f"{base}/{d}"
                    if os.path.islink(os.path.join(dirpath, d)):
                        continue
                    dirs.append(rel.replace(os.sep, "/"))
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    rel = (name if base == "." else f"{base}/{name}").replace(os.sep, "/")
                    try:
                        if not stat.S_ISREG(os.stat(full).st_mode):
                            continue  # a socket, fifo or device: not content
                    except OSError:
                        continue  # a dangling symlink
                    files.append(_file(full, rel))
        else:
            raise SourceError(f"SRC {src!r}: not a file or folder")
    except PermissionError as e:
        raise SourceError(f"SRC {src!r}: cannot read {e.filename} (permission denied)") from None
    return Source(root=str(p), files=files, dirs=dirs)
