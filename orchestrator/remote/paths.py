"""Names that come from a remote host, made safe before they touch the local disk.

A host sends file names (collection, a stage's manifest); none of them may climb out of
the directory it is written under, go through a symlink, or be anything but a plain
name. ``remote/collect.py`` and ``remote/sites.py`` both use these, so they live below both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class UnsafePath(ValueError):
    """A remote name that would escape the run directory or is not a plain name."""


def safe_name(name: str) -> str:
    """Return ``name`` if it is a single, plain path component; raise ``UnsafePath`` otherwise."""
    if not isinstance(name, str):
        raise UnsafePath(f"{name!r} is not a text name")
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UnsafePath(f"refusing remote name {name!r}")
    return name


def safe_local_path(root: Path, parts: Sequence[str]) -> Path:
    """``root/parts...`` after checking every part, that no existing component is a symlink, and that it stays in root."""
    if not parts:
        raise UnsafePath("empty path")
    root_real = Path(os.path.realpath(root))
    path = root_real
    for part in parts:
        path = path / safe_name(part)
        if path.is_symlink():
            raise UnsafePath(f"{path} is a symlink; not writing through it")
    real = Path(os.path.realpath(path))
    if real != path or root_real not in real.parents:
        raise UnsafePath(f"{'/'.join(parts)} resolves outside {root_real}")
    return path
