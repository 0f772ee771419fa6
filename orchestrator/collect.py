"""Bring a remote run's results home, without trusting the names the remote sends.

After every rank has exited (whatever the outcome) the SSH launcher pulls,
into the local run directory:

* the newest *complete* checkpoint found on any host (normally rank 0's):
  ``checkpoints/step-XXXXXXXX/`` with exactly the files its ``state.json``
  lists, checked for size remotely before the download and validated again
  locally with the runtime's own ``checkpoint.validate``; ``latest.json`` is
  rewritten locally to name it. Older checkpoints stay behind.
* every other regular file under the remote run directory (stats, metrics,
  anything the runtime or the script writes there): from the host of rank 0
  to the same place locally (never overwriting what the controller wrote),
  from the other hosts to ``hosts/<host>/...``.

Safety: a remote name is one path component that is not empty, ``.`` or
``..`` and contains no ``/``, ``\\`` or NUL; symlinks and special files are
skipped (``lstat`` types from the listing); every local destination is
checked to resolve inside the run directory with no symlinked component, and
written under a fresh temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from orchestrator.runtime import checkpoint as ckpt

MAX_DEPTH = 16
MAX_FILES = 10_000
MAX_JSON_BYTES = 1 << 20
SKIP_PREFIXES = (".tmp-", ".trash-")
# Top-level names in the local run dir that belong to the controller: remote files by these names go to the fallback.
RESERVED = frozenset({"summary.json", "events.jsonl", "logs", "plan.json", "mlx-hostfile.json", "staging.json", "hosts"})


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


def _split_rel(rel: str) -> list[str]:
    return [safe_name(p) for p in rel.split("/")]


@dataclass
class RemoteCheckpoint:
    host: str
    dir: str           # remote directory of the checkpoint
    name: str          # step-XXXXXXXX
    step: int
    files: dict        # name -> size, from state.json (plus state.json itself)


@dataclass
class CollectReport:
    files: int = 0
    bytes: int = 0
    checkpoint: Optional[str] = None
    skipped: list[str] = field(default_factory=list)   # names refused or unreadable
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- remote reading


async def _read_small(sftp, path: str, limit: int = MAX_JSON_BYTES) -> Optional[bytes]:
    import asyncssh

    try:
        attrs = await sftp.lstat(path)
        if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR or (attrs.size or 0) > limit:
            return None
        async with sftp.open(path, "rb") as f:
            return await f.read(limit + 1)
    except (asyncssh.SFTPError, OSError):
        return None


async def _is_regular_of_size(sftp, path: str, size: int) -> bool:
    import asyncssh

    try:
        attrs = await sftp.lstat(path)
    except (asyncssh.SFTPError, OSError):
        return False
    return attrs.type == asyncssh.FILEXFER_TYPE_REGULAR and attrs.size == size


async def _check_remote_checkpoint(sftp, host: str, root: str, name: str) -> Optional[RemoteCheckpoint]:
    d = f"{root}/{name}"
    raw = await _read_small(sftp, f"{d}/{ckpt.STATE_FILE}")
    if raw is None:
        return None
    try:
        state = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(state, dict) or state.get("format") != ckpt.FORMAT_VERSION or not isinstance(state.get("step"), int):
        return None
    files = state.get("files")
    if not isinstance(files, dict) or set(files) != {ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE}:
        return None
    for fname, size in files.items():
        if not isinstance(size, int) or not await _is_regular_of_size(sftp, f"{d}/{safe_name(fname)}", size):
            return None
    return RemoteCheckpoint(host=host, dir=d, name=name, step=int(state["step"]),
                            files={**files, ckpt.STATE_FILE: len(raw)})


async def find_checkpoint(sftp, host: str, remote_run_dir: str) -> Optional[RemoteCheckpoint]:
    """The newest complete checkpoint under ``<remote run dir>/checkpoints``: the manifest's target first."""
    import asyncssh

    root = f"{remote_run_dir}/{ckpt.CHECKPOINTS_DIR}"
    try:
        entries = await sftp.readdir(root)
    except (asyncssh.SFTPError, OSError):
        return None
    steps = []
    for e in entries:
        m = ckpt._STEP_DIR.match(e.filename) if isinstance(e.filename, str) else None
        if m and e.attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
            steps.append((int(m.group(1)), e.filename))
    candidates = [n for _, n in sorted(steps, reverse=True)]
    raw = await _read_small(sftp, f"{root}/{ckpt.MANIFEST}")
    if raw is not None:
        try:
            target = json.loads(raw).get("path")
        except (ValueError, AttributeError):
            target = None
        if isinstance(target, str) and ckpt._STEP_DIR.match(target) and target in candidates:
            candidates.remove(target)
            candidates.insert(0, target)
    for name in candidates:
        found = await _check_remote_checkpoint(sftp, host, root, name)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------- downloading


async def _download(sftp, remote: str, dest: Path) -> int:
    """Fetch one remote file to ``dest`` (already validated) via a temporary name; returns its size."""
    tmp = dest.with_name(f".tmp-pull-{secrets.token_hex(4)}-{dest.name}"[:255])
    try:
        await sftp.get(remote, str(tmp))
        size = tmp.stat().st_size
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def _local_manifest_step(root: Path) -> Optional[int]:
    target = ckpt.read_manifest(root)
    if target is None:
        return None
    try:
        return ckpt.validate(target).step
    except ckpt.CheckpointError:
        return None


async def pull_checkpoint(sftp, cp: RemoteCheckpoint, local_run_dir: Path, report: CollectReport) -> Optional[Path]:
    """Download ``cp`` into ``<local>/checkpoints/<name>`` and point ``latest.json`` at it (if it is the newest)."""
    local_root = Path(os.path.realpath(local_run_dir))
    ckpt_root = safe_local_path(local_root, [ckpt.CHECKPOINTS_DIR])
    ckpt_root.mkdir(exist_ok=True)
    final = safe_local_path(local_root, [ckpt.CHECKPOINTS_DIR, safe_name(cp.name)])
    if final.exists():
        try:
            ckpt.validate(final)
            report.checkpoint = str(final)
            return final  # already here and complete (e.g. the run dir is on a shared filesystem)
        except ckpt.CheckpointError:
            shutil.rmtree(final)
    staging = safe_local_path(local_root, [ckpt.CHECKPOINTS_DIR, f".tmp-pull-{cp.name}-{secrets.token_hex(4)}"])
    staging.mkdir()
    try:
        for fname in cp.files:
            report.bytes += await _download(sftp, f"{cp.dir}/{safe_name(fname)}", staging / safe_name(fname))
            report.files += 1
        ckpt.validate(staging)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    newest = _local_manifest_step(ckpt_root)
    if newest is None or newest <= cp.step:
        ckpt.write_json_atomic(ckpt_root / ckpt.MANIFEST, {"format": ckpt.FORMAT_VERSION, "step": cp.step, "path": cp.name})
    report.checkpoint = str(final)
    return final


async def pull_files(sftp, remote_run_dir: str, local_run_dir: Path, prefix: Sequence[str], report: CollectReport,
                     *, fallback_prefix: Optional[Sequence[str]] = None) -> None:
    """Every regular file under the remote run dir except ``checkpoints/``, to ``<local>/<prefix>/<rel>``.

    With ``fallback_prefix``, a file whose destination already exists locally
    goes under the fallback instead (the controller's own files are never overwritten).
    """
    import asyncssh

    local_root = Path(os.path.realpath(local_run_dir))
    count = 0

    async def walk(remote_dir: str, rel: list[str], depth: int) -> None:
        nonlocal count
        if depth > MAX_DEPTH:
            report.skipped.append("/".join(rel) + " (too deep)")
            return
        try:
            entries = await sftp.readdir(remote_dir)
        except (asyncssh.SFTPError, OSError) as e:
            if rel:
                report.errors.append(f"cannot list {remote_dir}: {e}")
            return
        for e in sorted(entries, key=lambda e: str(e.filename)):
            name = e.filename
            if name in (".", ".."):
                continue
            try:
                safe_name(name)
            except UnsafePath:
                report.skipped.append(repr(name))
                continue
            if not rel and name == ckpt.CHECKPOINTS_DIR:
                continue
            if name.startswith(SKIP_PREFIXES):
                continue
            kind = e.attrs.type
            if kind == asyncssh.FILEXFER_TYPE_DIRECTORY:
                await walk(posixpath.join(remote_dir, name), rel + [name], depth + 1)
                continue
            if kind != asyncssh.FILEXFER_TYPE_REGULAR:
                report.skipped.append("/".join(rel + [name]) + " (not a regular file)")
                continue
            if count >= MAX_FILES:
                report.skipped.append("/".join(rel + [name]) + f" (more than {MAX_FILES} files)")
                continue
            try:
                dest = safe_local_path(local_root, [*prefix, *rel, name])
                taken = dest.exists() or dest.is_symlink() or (not prefix and (rel or [name])[0] in RESERVED)
                if fallback_prefix is not None and taken:
                    dest = safe_local_path(local_root, [*fallback_prefix, *rel, name])
                dest.parent.mkdir(parents=True, exist_ok=True)
                safe_local_path(local_root, [*dest.relative_to(local_root).parts])  # the dirs just made
                report.bytes += await _download(sftp, posixpath.join(remote_dir, name), dest)
                report.files += 1
                count += 1
            except UnsafePath as err:
                report.skipped.append(f"{'/'.join(rel + [name])} ({err})")
            except (asyncssh.SFTPError, OSError) as err:
                report.errors.append(f"{'/'.join(rel + [name])}: {err}")

    await walk(remote_run_dir, [], 0)
