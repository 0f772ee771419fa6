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

Limits (``Limits``; sizes come from the remote listing and are checked before
a byte is downloaded, and a download never reads past the size it announced):
1 GiB per file and 8 GiB per ``Budget`` (one per host unless the caller shares
one across hosts), checkpoints excepted; a time limit per host for its files
and for its checkpoint. Whatever is left behind is named in
``CollectReport.skipped`` with the reason, never silently.

Reserved names: every top-level name the controller writes in the run
directory (``RESERVED``, plus anything starting with ``.``, compared without
case for case-insensitive filesystems) is never written by a remote file:
it goes under ``hosts/<host>/`` instead, or is skipped with a note.

Safety: a remote name is one path component that is not empty, ``.`` or
``..`` and contains no ``/``, ``\\`` or NUL; symlinks and special files are
skipped (``lstat`` types from the listing); every local destination is
checked to resolve inside the run directory with no symlinked component, and
written under a fresh temporary name and renamed into place.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from orchestrator import rundir
from orchestrator.runtime import checkpoint as ckpt
from orchestrator.remote.paths import UnsafePath, safe_local_path, safe_name  # noqa: F401  (re-exported)
from orchestrator.units import human_bytes

if TYPE_CHECKING:
    from orchestrator.remote.sites import Site

MAX_DEPTH = 16
MAX_FILES = 10_000
MAX_JSON_BYTES = 1 << 20
CHUNK = 4 << 20
GiB = 1 << 30
SKIP_PREFIXES = (".tmp-", ".trash-")
# Top-level names in the local run dir that belong to the controller (lower case; names starting
# with "." are reserved too): remote files by these names go to the fallback, or are skipped.
# What rank 0 wrote in its remote working directory (the staged copy of the script's directory).
WORKDIR = rundir.WORKDIR
RESERVED = frozenset({
    rundir.SUMMARY, rundir.EVENTS, rundir.LOGS, rundir.CHECKPOINTS, rundir.PLAN, rundir.MLX_HOSTFILE,
    rundir.STAGING, rundir.HOSTS, rundir.REPORT_HTML, rundir.REPORT_DIR, rundir.LOCK_FILE, WORKDIR,
    rundir.PREVIOUS,
})


def reserved(name: str) -> bool:
    """A top-level name of the local run directory that only the controller writes."""
    return name.startswith(".") or name.lower() in RESERVED


@dataclass(frozen=True)
class Limits:
    """What one collection may bring home; checked against the remote sizes before downloading."""

    file_bytes: int = 1 * GiB          # any one file (checkpoint files excepted)
    total_bytes: int = 8 * GiB         # all files of one Budget (checkpoint files excepted)
    files: int = MAX_FILES             # files of one Budget
    host_timeout_s: float = 300.0      # listing and downloading one host's files
    checkpoint_timeout_s: float = 1800.0  # downloading the checkpoint
    list_timeout_s: float = 60.0       # looking for a checkpoint on one host


DEFAULT_LIMITS = Limits()


@dataclass
class Budget:
    """What a collection used so far: share one between the hosts of a run for a run-wide total."""

    bytes: int = 0
    files: int = 0


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
    from orchestrator.remote.ssh import asyncssh

    try:
        attrs = await sftp.lstat(path)
        if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR or (attrs.size or 0) > limit:
            return None
        async with sftp.open(path, "rb") as f:
            return await f.read(limit + 1)
    except (asyncssh.SFTPError, OSError):
        return None


async def _is_regular_of_size(sftp, path: str, size: int) -> bool:
    from orchestrator.remote.ssh import asyncssh

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


async def find_checkpoint(sftp, host: str, remote_run_dir: str, limits: Limits = DEFAULT_LIMITS) -> Optional[RemoteCheckpoint]:
    """The newest complete checkpoint under ``<remote run dir>/checkpoints``: the manifest's target first.

    None also when the host does not answer within ``limits.list_timeout_s``.
    """
    try:
        return await asyncio.wait_for(_find_checkpoint(sftp, host, remote_run_dir), limits.list_timeout_s)
    except asyncio.TimeoutError:
        return None


async def _find_checkpoint(sftp, host: str, remote_run_dir: str) -> Optional[RemoteCheckpoint]:
    from orchestrator.remote.ssh import asyncssh

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


async def _download(sftp, remote: str, dest: Path, size: int) -> int:
    """Fetch at most ``size`` bytes (what the listing announced, already checked against the limits)
    of one remote file to ``dest`` (already validated), via a temporary name; returns the bytes written.
    A file that grew since the listing is cut at the announced size: the limits hold whatever the remote does."""
    tmp = dest.with_name(f".tmp-pull-{secrets.token_hex(4)}-{dest.name}"[:255])
    got = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with open(fd, "wb") as out:
            async with sftp.open(remote, "rb") as f:
                while got < size:
                    data = await f.read(min(CHUNK, size - got))
                    if not data:
                        break
                    data = data[: size - got]
                    out.write(data)
                    got += len(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return got


def _local_manifest_step(root: Path) -> Optional[int]:
    target = ckpt.read_manifest(root)
    if target is None:
        return None
    try:
        return ckpt.validate(target).step
    except ckpt.CheckpointError:
        return None


async def pull_checkpoint(sftp, cp: RemoteCheckpoint, local_run_dir: Path, report: CollectReport,
                          limits: Limits = DEFAULT_LIMITS) -> Optional[Path]:
    """Download ``cp`` into ``<local>/checkpoints/<name>`` and point ``latest.json`` at it (if it is the newest).

    Raises ``TimeoutError`` after ``limits.checkpoint_timeout_s`` (nothing partial is left behind)."""
    try:
        return await asyncio.wait_for(_pull_checkpoint(sftp, cp, local_run_dir, report), limits.checkpoint_timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"checkpoint {cp.name} from {cp.host}: not downloaded within {limits.checkpoint_timeout_s:g}s") from None


async def _pull_checkpoint(sftp, cp: RemoteCheckpoint, local_run_dir: Path, report: CollectReport) -> Optional[Path]:
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
        for fname, size in cp.files.items():
            report.bytes += await _download(sftp, f"{cp.dir}/{safe_name(fname)}", staging / safe_name(fname), size)
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
                     *, fallback_prefix: Optional[Sequence[str]] = None, limits: Limits = DEFAULT_LIMITS,
                     budget: Optional[Budget] = None, skip: Optional[Callable[[str, int], bool]] = None) -> None:
    """Every regular file under the remote run dir except ``checkpoints/``, to ``<local>/<prefix>/<rel>``.

    ``skip(rel, size)`` True leaves a file out without a note (e.g. the files
    staging itself put in a working directory).

    With ``fallback_prefix``, a file whose destination already exists locally, or
    whose top-level name is reserved for the controller (``reserved()``), goes under
    the fallback instead; without one, such a file is skipped with a note. Sizes are
    checked against ``limits`` and ``budget`` (default: this call's own) before any
    download; the whole call stops after ``limits.host_timeout_s``.
    """
    budget = budget if budget is not None else Budget()
    try:
        await asyncio.wait_for(_pull_files(sftp, remote_run_dir, Path(os.path.realpath(local_run_dir)), list(prefix),
                                           report, fallback_prefix, limits, budget, skip), limits.host_timeout_s)
    except asyncio.TimeoutError:
        report.errors.append(f"collection stopped after {limits.host_timeout_s:g}s; "
                             f"files not yet downloaded stay in {remote_run_dir}")


async def _pull_files(sftp, remote_run_dir: str, local_root: Path, prefix: list[str], report: CollectReport,
                      fallback_prefix: Optional[Sequence[str]], limits: Limits, budget: Budget,
                      skip: Optional[Callable[[str, int], bool]] = None) -> None:
    from orchestrator.remote.ssh import asyncssh

    async def walk(remote_dir: str, rel: list[str], depth: int) -> None:
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
            shown = "/".join(rel + [name])
            if not rel and name == ckpt.CHECKPOINTS_DIR:
                continue  # pull_checkpoint's business
            if name.startswith(SKIP_PREFIXES):
                report.skipped.append(f"{shown} (temporary)")
                continue
            kind = e.attrs.type
            if kind == asyncssh.FILEXFER_TYPE_DIRECTORY:
                await walk(posixpath.join(remote_dir, name), rel + [name], depth + 1)
                continue
            if kind != asyncssh.FILEXFER_TYPE_REGULAR:
                report.skipped.append(f"{shown} (not a regular file)")
                continue
            size = e.attrs.size
            if not isinstance(size, int) or size < 0:
                report.skipped.append(f"{shown} (no size in the listing)")
                continue
            if skip is not None and skip(shown, size):
                continue
            if size > limits.file_bytes:
                report.skipped.append(f"{shown} ({human_bytes(size)}, over the {human_bytes(limits.file_bytes)} per-file limit)")
                continue
            if budget.files >= limits.files:
                report.skipped.append(f"{shown} (more than {limits.files} files)")
                continue
            if budget.bytes + size > limits.total_bytes:
                report.skipped.append(f"{shown} ({human_bytes(size)}, over the {human_bytes(limits.total_bytes)} total limit)")
                continue
            budget.bytes += size  # reserved before the download: hosts sharing the budget cannot overshoot it together
            budget.files += 1
            got, done = 0, False
            try:
                dest = safe_local_path(local_root, [*prefix, *rel, name])
                # At the top of the run dir, what exists (or is reserved) is the controller's; under a
                # prefix (hosts/<host>/) the area is this host's own, and a restarted attempt's files are replaced.
                taken = not prefix and (dest.exists() or dest.is_symlink() or reserved((rel or [name])[0]))
                if taken:
                    if fallback_prefix is None:
                        report.skipped.append(f"{shown} (its name is the controller's; not overwritten)")
                        continue
                    dest = safe_local_path(local_root, [*fallback_prefix, *rel, name])
                dest.parent.mkdir(parents=True, exist_ok=True)
                safe_local_path(local_root, [*dest.relative_to(local_root).parts])  # the dirs just made
                got = await _download(sftp, posixpath.join(remote_dir, name), dest, size)
                report.bytes += got
                report.files += 1
                done = True
            except UnsafePath as err:
                report.skipped.append(f"{shown} ({err})")
            except (asyncssh.SFTPError, OSError) as err:
                report.errors.append(f"{shown}: {err}")
            finally:
                budget.bytes -= size - got  # give back what was reserved and not used
                budget.files -= 0 if done else 1

    await walk(remote_run_dir, [], 0)


# ----------------------------------------------------------------------------- one run's collection


async def collect_run(local_run_dir: Path, sites: Sequence["Site"], rank0_index: Optional[int],
                      staged_code: Optional[dict[str, int]], err) -> tuple[dict, set[int]]:
    """Checkpoint and files of every site still reachable, home; ``(the "collected" stats, sites to keep)``.

    ``staged_code``: ``{path: size}`` of the staged script directory when rank 0 runs in it (no
    --cwd): what rank 0 wrote there comes to ``workdir/``, every file staging did not put there (new,
    or now of another size), bytecode caches left out; None leaves working directories alone.
    A site whose collection failed keeps its remote directory (and the report says where).
    """
    live = [s for s in sites if s.link.usable and s.run_dir]
    reports = {s.index: CollectReport() for s in sites}
    # The newest complete checkpoint on any host (normally only rank 0's has one).
    found = await asyncio.gather(*(find_checkpoint(s.link.sftp, s.label, s.run_dir) for s in live),
                                 return_exceptions=True)
    best = None
    for site, cp in zip(live, found):
        if isinstance(cp, RemoteCheckpoint) and (best is None or cp.step > best[1].step):
            best = (site, cp)
    if best is not None:
        site, cp = best
        try:
            await pull_checkpoint(site.link.sftp, cp, local_run_dir, reports[site.index])
        except Exception as e:  # unsafe local path, transfer error, or damaged in transit (CheckpointError)
            reports[site.index].errors.append(f"checkpoint {cp.name} from {site.label}: {e}")
    # Everything else: rank 0's host into the run dir itself, the others under hosts/<name>/.
    first = [s for s in live if s.index == rank0_index]
    rest = [s for s in live if s.index != rank0_index]
    for site in first:
        await pull_files(site.link.sftp, site.run_dir, local_run_dir, [], reports[site.index],
                         fallback_prefix=[rundir.HOSTS, site.label])
        if staged_code is not None and site.stage_code and site.code_dir:
            await pull_files(site.link.sftp, site.code_dir, local_run_dir, [WORKDIR], reports[site.index],
                             skip=lambda rel, size: staged_code.get(rel) == size or "__pycache__" in rel.split("/"))
    results = await asyncio.gather(*(pull_files(s.link.sftp, s.run_dir, local_run_dir, [rundir.HOSTS, s.label],
                                                reports[s.index]) for s in rest), return_exceptions=True)
    for site, r in zip(rest, results):
        if isinstance(r, BaseException):
            reports[site.index].errors.append(f"{site.label}: {r}")
    keep: set[int] = set()
    for site in sites:
        if site.run_root and site not in live:
            reports[site.index].errors.append(f"{site.label}: not collected ({site.link.ssh.lost_reason})")
        if reports[site.index].errors and site.run_root:
            keep.add(site.index)
            reports[site.index].errors.append(f"{site.label}: its files stay in {site.run_root}")
    total = CollectReport()
    for r in reports.values():
        total.files += r.files
        total.bytes += r.bytes
        total.checkpoint = total.checkpoint or r.checkpoint
        total.skipped += r.skipped
        total.errors += r.errors
    for line in total.errors:
        err.write(f"orch: collect: {line}\n")
    if total.skipped:
        err.write(f"orch: collect: skipped {len(total.skipped)} remote name(s): {', '.join(total.skipped[:5])}\n")
    return ({"files": total.files, "bytes": total.bytes, "checkpoint": total.checkpoint,
             "skipped": total.skipped, "errors": total.errors}, keep)
