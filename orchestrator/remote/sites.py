"""Where one run lives on its remote hosts, from its first upload to its retirement.

On each host (``BASE`` = ``~/.cache/mlx-orch`` under the login user's home)::

    BASE/runs/<run-id>-h<i>/           a site's run root: one per hostfile entry, even on a shared filesystem
    BASE/runs/<run-id>-h<i>/run/       the ranks' ORCH_RUN_DIR: collected at the end (``collect.py``)
    BASE/runs/<run-id>-h<i>/code/      the staged script directory (rank 0's working directory: its new files
                                       are collected to RUN/workdir/)
    BASE/runs/<run-id>-h<i>/<FILE>     per-job inputs a rank's environment names (MLX_IBV_DEVICES): not collected
    BASE/runs/<run-id>-h<i>/resume/    --resume-arg on a restart: this host's copy of the file to resume from
    BASE/runs/.trash-<run-id>-h<i>/    retired after collection; a later run deletes it in the background

``<run-id>`` is the local run directory's name plus a random suffix, fresh per
attempt: a restart gets new sites, and the restart re-staging (``restage_paths``:
the latest local checkpoint to rank 0's site, the resume file to every site) fills them.

A *site* is one hostfile entry; a *host link* is one SSH connection (entries
with the same name, user and port share it) with its SFTP session.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from orchestrator import rundir
from orchestrator.remote import REMOTE_BASE
from orchestrator.remote.ssh import Connection, asyncssh

if TYPE_CHECKING:
    from orchestrator.remote.stager import RemoteStager, StageStats

TRASH_PREFIX = ".trash-"          # runs/.trash-<run-id>-h<i>: collected, retired, deleted by a later run
RETIRE_TIMEOUT_S = 30.0
STATS_FILE = rundir.STAGING       # in the local run directory: what was staged and collected


def _new_stats() -> "StageStats":
    from orchestrator.remote.stager import StageStats

    return StageStats()


@dataclass
class HostLink:
    """One machine: its SSH connection, its SFTP session, and where this run's shared things are there."""

    ssh: Connection
    sftp: Optional[asyncssh.SFTPClient] = None
    home: Optional[str] = None
    stager: Optional["RemoteStager"] = None
    runtime_dir: Optional[str] = None   # the staged runtime (the ranks' PYTHONPATH)
    stats: "StageStats" = field(default_factory=_new_stats)

    @property
    def name(self) -> str:
        return self.ssh.name

    @property
    def base(self) -> str:
        return f"{(self.home or '').rstrip('/')}/{REMOTE_BASE}"

    @property
    def usable(self) -> bool:
        """Connected, not lost, with its SFTP session: files can still move."""
        return self.ssh.alive and self.sftp is not None


@dataclass
class Site:
    """One hostfile entry (host index) on a link: its own run root, even on a shared filesystem."""

    index: int
    link: HostLink
    label: str = ""                 # safe local name for hosts/<label>/
    stage_code: bool = False        # a script runs here from the staged copy of its directory
    run_root: Optional[str] = None  # BASE/runs/<run-id>-h<i>
    code_dir: Optional[str] = None
    run_dir: Optional[str] = None


def new_run_id(local_run_dir: Path) -> str:
    """The local run directory's name plus a random suffix: two runs (or attempts) never share a site."""
    return f"{local_run_dir.name}-{secrets.token_hex(3)}"


def site_label(names: dict[int, str], index: int) -> str:
    """``hosts/<label>/``: the host's name, with its index when several entries share the name; never unsafe."""
    from orchestrator.remote.paths import UnsafePath, safe_name

    name = names[index]
    label = name if sum(1 for n in names.values() if n == name) <= 1 else f"{name}-{index}"
    try:
        return safe_name(label)
    except UnsafePath:
        return f"h{index}"


def place(site: Site, run_id: str) -> None:
    """Every remote path of the site (nothing is created here; its link's ``home`` must be known)."""
    site.run_root = f"{site.link.base}/runs/{run_id}-h{site.index}"
    site.run_dir = f"{site.run_root}/run"
    site.code_dir = f"{site.run_root}/code" if site.stage_code else None


def resume_path(site: Site, local_file: Optional[str]) -> Optional[str]:
    """--resume-arg on a restart: where this site's copy of the local ``local_file`` is."""
    return f"{site.run_root}/resume/{Path(local_file).name}" if local_file and site.run_root else None


def latest_checkpoint(local_run_dir: Path) -> Optional[tuple[Path, Path]]:
    """A restarted attempt resumes from the checkpoint the last one brought home: ``(its directory, latest.json)``,
    or None. Every attempt gets fresh sites, so rank 0's site gets it again."""
    local = local_run_dir / rundir.CHECKPOINTS
    manifest = local / rundir.LATEST
    if not manifest.is_file():
        return None
    try:
        name = json.loads(manifest.read_text()).get("path")
    except ValueError:
        return None
    src = local / str(name)
    if not name or not src.is_dir():
        return None
    return src, manifest


def write_stats(local_run_dir: Optional[Path], stats: dict) -> None:
    """``staging.json`` in the local run directory, atomically."""
    if local_run_dir is None or not local_run_dir.is_dir():
        return
    path = local_run_dir / STATS_FILE
    tmp = path.with_name(f".{STATS_FILE}.tmp")
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the end of a run's sites


async def retire(link: HostLink, roots: Iterable[str]) -> None:
    """Retire run roots on one host (collected already): one rename each into ``runs/.trash-*``.

    Over SFTP, not a shell command (a remote session pays for the login shell's rc files).
    The deletion happens in the background of a later run on that host (``purge_trash``).
    """
    roots = list(roots)
    if not roots or link.sftp is None:
        return

    async def one(root: str) -> None:
        parent, name = root.rsplit("/", 1)
        try:
            await link.sftp.posix_rename(root, f"{parent}/{TRASH_PREFIX}{name}")
        except (asyncssh.SFTPError, OSError):
            await link.sftp.rmtree(root, ignore_errors=True)

    await asyncio.gather(*(asyncio.wait_for(one(r), RETIRE_TIMEOUT_S) for r in roots))


async def purge_trash(links: Iterable[HostLink]) -> None:
    """Delete run roots that earlier runs retired (any controller's: they were collected already)."""
    async def purge(link: HostLink) -> None:
        runs = f"{link.base}/runs"
        try:
            entries = await link.sftp.readdir(runs)
        except (asyncssh.SFTPError, OSError):
            return
        for e in entries:
            if isinstance(e.filename, str) and e.filename.startswith(TRASH_PREFIX):
                await link.sftp.rmtree(f"{runs}/{e.filename}", ignore_errors=True)

    await asyncio.gather(*(purge(l) for l in links if l.usable and l.home), return_exceptions=True)


def stats_summary(run_id: str, prepare_s: float, links: list[HostLink], sites: Iterable[Site]) -> dict[str, Any]:
    """What ``staging.json`` says after staging."""
    return {
        "run_id": run_id,
        "prepare_s": round(prepare_s, 4),
        "uploaded_files": sum(l.stats.uploaded_files for l in links),
        "uploaded_bytes": sum(l.stats.uploaded_bytes for l in links),
        "hosts": {l.name: l.stats.as_dict() for l in links},
        "remote_dirs": {s.label: s.run_root for s in sites},
    }
